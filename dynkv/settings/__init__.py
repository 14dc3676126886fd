"""Settings: KVBM (`DYN_KVBM_*`) and deployment (`DYNKV_*`), composed with tier profiles.

Precedence is CLI flag > environment > profile file > built-in default, and every resolved value
remembers which of those it came from (`dynkv config` prints it).
"""

from dynkv.settings.deployment import DeploymentSettings
from dynkv.settings.errors import SettingsError
from dynkv.settings.profiles import Profile, list_profiles, load_profile
from dynkv.settings.resolve import Resolved, resolve

__all__ = [
    "DeploymentSettings",
    "Profile",
    "Resolved",
    "SettingsError",
    "list_profiles",
    "load_profile",
    "resolve",
]
