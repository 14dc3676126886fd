"""vLLM's KV events → G1 events in the runtime's keys (docs/kv-events.md): chains, parents,
removals, clears, what is left out, the bounded map, and vLLM 0.32's wire format."""

from __future__ import annotations

import pytest
from vllm_events_support import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    encode,
    stored,
)

from dynkv.kvbm.g1_bridge import G1Bridge
from dynkv.kvbm.g1_events import (
    BadPayload,
    G1Translator,
    VllmCleared,
    VllmRemoved,
    VllmStored,
    decode_batch,
    g1_fingerprint,
)
from dynkv.kvbm.keys import BlockHasher, extra_keys

BS = 4
HASHER = BlockHasher(b"\x07" * 16, BS)

# encoded by vLLM 0.32's own classes (vllm.distributed.kv_events): KVEventBatch(ts=1.5, [
#   BlockStored([01*32, 02*32], parent None, [1,2,3,4], block_size 2, salt "tenant-a" in block 0),
#   BlockStored([03*32], parent 02*32, [5,6]), BlockStored([7], LoRA "ad"),
#   BlockRemoved([03*32]), AllBlocksCleared()], data_parallel_rank=0)
VLLM_032_BATCH = bytes.fromhex(
    "93cb3ff8000000000000958aa474797065ab426c6f636b53746f726564ac626c6f636b5f68617368657392c420"
    + "01" * 32
    + "c420"
    + "02" * 32
    + "b1706172656e745f626c6f636b5f68617368c0a9746f6b656e5f6964739401020304aa626c6f636b5f73697a65"
    "02a76c6f72615f6964c0a66d656469756da3475055a96c6f72615f6e616d65c0aa65787472615f6b6579739291a8"
    "74656e616e742d61c0a967726f75705f6964780089a474797065ab426c6f636b53746f726564ac626c6f636b5f68"
    "617368657391c420" + "03" * 32 + "b1706172656e745f626c6f636b5f68617368c420" + "02" * 32 + "a9"
    "746f6b656e5f696473920506aa626c6f636b5f73697a6502a76c6f72615f6964c0a66d656469756da3475055a96c"
    "6f72615f6e616d65c0a967726f75705f696478008aa474797065ab426c6f636b53746f726564ac626c6f636b5f68"
    "617368657391" + "07b1706172656e745f626c6f636b5f68617368c0a9746f6b656e5f696473920909aa626c6f63"
    "6b5f73697a6502a76c6f72615f696403a66d656469756da3475055a96c6f72615f6e616d65a26164aa6578747261"
    "5f6b6579739191a26164a967726f75705f6964780084a474797065ac426c6f636b52656d6f766564ac626c6f636b"
    "5f68617368657391c420" + "03" * 32 + "a66d656469756da3475055a967726f75705f6964780081a4747970"
    "65b0416c6c426c6f636b73436c656172656400"
)


class Sink:
    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.held: set[int] = set()

    def g1_changed(self, stored=(), removed=()) -> None:
        self.calls.append(("changed", list(stored), list(removed)))
        self.held.difference_update(removed)
        self.held.update(stored)

    def g1_cleared(self) -> None:
        self.calls.append(("cleared",))
        self.held.clear()


def vllm_stored(hashes, parent, tokens, **kw) -> VllmStored:
    return decode_batch(encode([stored(hashes, parent, tokens, BS, **kw)]))[0]


def tokens(n_blocks: int, start: int = 100) -> list[int]:
    return list(range(start, start + n_blocks * BS))


def test_the_test_encoder_writes_vllm_032_bytes_and_they_decode():
    ours = encode(
        [
            stored([b"\x01" * 32, b"\x02" * 32], None, [1, 2, 3, 4], 2, salt="tenant-a"),
            stored([b"\x03" * 32], b"\x02" * 32, [5, 6], 2),
            _lora_block(),
            BlockRemoved(block_hashes=[b"\x03" * 32], medium="GPU", group_idx=0),
            AllBlocksCleared(),
        ]
    )
    assert ours == VLLM_032_BATCH
    events = decode_batch(VLLM_032_BATCH)
    assert events[0] == VllmStored(
        hashes=[b"\x01" * 32, b"\x02" * 32],
        parent=None,
        token_ids=[1, 2, 3, 4],
        block_size=2,
        medium="GPU",
        extra=[["tenant-a"], None],
        group=0,
    )
    assert events[1].parent == b"\x02" * 32 and events[2].lora_name == "ad"
    assert events[3:] == [VllmRemoved([b"\x03" * 32], "GPU", 0), VllmCleared()]


def _lora_block() -> BlockStored:
    # vLLM 0.32 puts the LoRA name in lora_name and in the block's extra keys, lora_id its int id
    return BlockStored(
        block_hashes=[7],
        parent_block_hash=None,
        token_ids=[9, 9],
        block_size=2,
        lora_id=3,
        medium="GPU",
        lora_name="ad",
        extra_keys=[("ad",)],
        group_idx=0,
    )


@pytest.mark.parametrize("payload", [b"", b"\x93\x01", encode([]) + b"x", b"\x92\x01\x90"[:2]])
def test_what_is_not_a_vllm_batch_is_refused(payload):
    with pytest.raises(BadPayload):
        decode_batch(payload)


def test_a_chain_gets_the_keys_a_router_computes_from_the_prompt_salt_included():
    t = G1Translator(HASHER)
    sink = Sink()
    prompt = tokens(5)
    t.apply([vllm_stored([b"a", b"b", b"c"], None, prompt[: 3 * BS], salt="s1")], sink)
    # the next step stores two more blocks under the last one: the parent's key continues
    t.apply([vllm_stored([b"d", b"e"], b"c", prompt[3 * BS :])], sink)
    want = HASHER.keys(prompt, extra_keys("s1"))
    assert sink.calls == [("changed", want[:3], []), ("changed", want[3:], [])]
    assert t.key_of(b"e") == want[4] and len(t) == 5
    assert HASHER.keys(prompt, extra_keys("s2"))[0] not in sink.held  # another tenant's root


def test_removals_use_the_map_and_unknown_hashes_are_ignored():
    t, sink = G1Translator(HASHER), Sink()
    t.apply([vllm_stored([1, 2], None, tokens(2))], sink)
    keys = HASHER.keys(tokens(2))
    t.apply(decode_batch(encode([BlockRemoved(block_hashes=[2, 99], medium="GPU")])), sink)
    assert sink.calls[-1] == ("changed", [], [keys[1]])
    assert sink.held == {keys[0]} and t.key_of(2) is None and t.counters.removed == 1


def test_a_block_whose_parent_is_unknown_is_left_out_and_so_are_its_children():
    t, sink = G1Translator(HASHER), Sink()
    t.apply([vllm_stored([b"x"], b"never-seen", tokens(1))], sink)
    t.apply([vllm_stored([b"y"], b"x", tokens(1, 500))], sink)
    assert sink.calls == [] and len(t) == 0
    assert t.counters.reasons == {"unknown_parent": 2}


@pytest.mark.parametrize(
    "event, reason",
    [
        (stored([1], None, tokens(1), BS, lora="adapter"), "lora"),
        (stored([1], None, tokens(2), BS * 2), "block_size"),  # partial-block entries
        (stored([1, 2], None, tokens(1), BS), "block_size"),  # fewer tokens than blocks
        (
            BlockStored(
                block_hashes=[1],
                parent_block_hash=None,
                token_ids=tokens(1),
                block_size=BS,
                lora_id=None,
                medium="GPU",
                lora_name=None,
                extra_keys=[(("mm-hash", 0), "salt")],  # multimodal: not keyed by the runtime
            ),
            "extra_keys",
        ),
        (
            BlockStored(
                block_hashes=[1],
                parent_block_hash=None,
                token_ids=tokens(1),
                block_size=BS,
                lora_id=None,
                medium="GPU",
                lora_name=None,
                extra_keys=[(b"embeds-digest",)],
            ),
            "extra_keys",
        ),
    ],
)
def test_blocks_the_runtime_would_key_differently_are_left_out(event, reason):
    t, sink = G1Translator(HASHER), Sink()
    t.apply(decode_batch(encode([event])), sink)
    assert sink.calls == [] and reason in t.counters.reasons


def test_later_blocks_with_extra_keys_end_the_bridged_part_of_a_chain():
    event = BlockStored(
        block_hashes=[1, 2, 3],
        parent_block_hash=None,
        token_ids=tokens(3),
        block_size=BS,
        lora_id=None,
        medium="GPU",
        lora_name=None,
        extra_keys=[None, None, (("img", 0),)],
    )
    t, sink = G1Translator(HASHER), Sink()
    t.apply(decode_batch(encode([event])), sink)
    assert sink.calls == [("changed", HASHER.keys(tokens(3))[:2], [])]
    assert t.counters.reasons == {"extra_keys": 1}


def test_other_pools_and_cache_groups_are_not_g1():
    t, sink = G1Translator(HASHER), Sink()
    t.apply([vllm_stored([1], None, tokens(1), medium="CPU")], sink)
    t.apply([vllm_stored([2], None, tokens(1), group=1)], sink)
    t.apply([vllm_stored([3], None, tokens(1))], sink)
    t.apply(decode_batch(encode([BlockRemoved(block_hashes=[3], medium="CPU")])), sink)
    assert len(sink.calls) == 1 and t.key_of(3) is not None


def test_a_restore_is_not_republished_and_cleared_forgets_everything():
    t, sink = G1Translator(HASHER), Sink()
    t.apply([vllm_stored([1], None, tokens(1))], sink)
    t.apply([vllm_stored([1], None, tokens(1))], sink)  # a second device copy, same content
    assert len(sink.calls) == 1
    t.apply([VllmCleared()], sink)
    assert sink.calls[-1] == ("cleared",) and len(t) == 0 and not sink.held
    t.apply([VllmCleared()], sink)  # nothing known: nothing to say
    assert len(sink.calls) == 2


def test_the_map_is_bounded_and_what_it_forgets_is_reported_removed():
    t, sink = G1Translator(HASHER, max_blocks=4), Sink()
    prompt = tokens(6)
    keys = HASHER.keys(prompt)
    t.apply([vllm_stored([0, 1, 2], None, prompt[: 3 * BS])], sink)
    t.apply([vllm_stored([3, 4, 5], 2, prompt[3 * BS :])], sink)
    assert len(t) == 4 and t.counters.forgotten == 2
    assert sink.calls[-1] == ("changed", keys[3:], keys[:2])
    assert sink.held == set(keys[2:])
    # an event larger than the bound keeps its newest blocks only
    t2, sink2 = G1Translator(HASHER, max_blocks=2), Sink()
    t2.apply([vllm_stored(list(range(6)), None, prompt)], sink2)
    assert sink2.held == set(keys[4:]) and len(t2) == 2


def test_the_bridge_reports_g1_cleared_when_vllm_batches_are_missing_or_unreadable():
    t, sink = G1Translator(HASHER), Sink()
    bridge = G1Bridge("ipc:///nowhere", t, sink)
    frame = lambda seq, events: [b"", seq.to_bytes(8, "big"), encode(events)]  # noqa: E731
    bridge.on_message(frame(0, [stored([1], None, tokens(1), BS)]))
    assert sink.held and bridge.gaps == 0
    bridge.on_message(frame(2, [stored([2], None, tokens(1, 300), BS)]))  # batch 1 lost
    assert bridge.gaps == 1 and sink.held == {HASHER.keys(tokens(1, 300))[0]}
    assert ("cleared",) in sink.calls
    bridge.on_message([b"", (3).to_bytes(8, "big"), b"not msgpack"])
    assert bridge.gaps == 2 and not sink.held and len(t) == 0
    bridge.on_message([b"only one frame"])
    assert bridge.gaps == 3


def test_workers_without_kvbm_have_a_stable_fingerprint_of_model_and_block_size():
    assert g1_fingerprint("m", 32) == g1_fingerprint("m", 32)
    assert len({g1_fingerprint("m", 32), g1_fingerprint("m", 64), g1_fingerprint("n", 32)}) == 3
    assert len(g1_fingerprint("m", 32)) == 16
