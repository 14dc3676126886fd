"""`dynkv advise`: whether offloading pays on a running deployment, and what to change
(docs/advise.md)."""
