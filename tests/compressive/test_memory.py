import torch
from hypothesis import given, settings, strategies as st

from still.compressive.memory import MemoryState, update_layer_memory, update_validity


def seq(start, n, b=1):
    """(b, n, 1) tensors whose values are their positions: start, start + 1, ..."""
    return torch.arange(start, start + n, dtype=torch.float32).view(1, n, 1).repeat(b, 1, 1)


def sum_groups(old):  # a visible f_c: each compressed slot is the sum of its c memories
    return old.view(old.shape[0], -1, 4, old.shape[2]).sum(2)


def test_memory_fills_then_compresses_the_oldest_in_order():
    memory, compressed = seq(0, 0), seq(0, 0)
    log = []
    for step in range(4):  # segments of 8 tokens: positions 8*step ... 8*step + 7
        memory, compressed, old, fresh = update_layer_memory(memory, compressed, seq(8 * step, 8), mem_len=8,
                                                             c_mem_len=4, rate=4, compress=sum_groups)
        log.append((memory.flatten().tolist(), compressed.flatten().tolist(),
                    None if old is None else old.flatten().tolist()))
    assert log[0] == (list(range(0, 8)), [], None)  # memory not full yet: nothing compressed
    assert log[1] == (list(range(8, 16)), [0 + 1 + 2 + 3, 4 + 5 + 6 + 7], list(range(0, 8)))
    assert log[2][0] == list(range(16, 24)) and log[2][1] == [6.0, 22.0, 38.0, 54.0]
    # c_mem_len 4 reached: the oldest compressed memories are dropped
    assert log[3][1] == [38.0, 54.0, 70.0, 86.0]


def test_transformer_xl_drops_the_oldest():
    memory, compressed, old, _ = update_layer_memory(seq(0, 6), seq(0, 0), seq(6, 4), mem_len=6, c_mem_len=0, rate=4,
                                                     compress=None)
    assert memory.flatten().tolist() == [4, 5, 6, 7, 8, 9] and compressed.shape[1] == 0 and old is None


def test_no_memory_at_all():
    memory, compressed, _, _ = update_layer_memory(seq(0, 0), seq(0, 0), seq(0, 5), mem_len=0, c_mem_len=0, rate=4,
                                                   compress=None)
    assert memory.shape == (1, 0, 1) and compressed.shape == (1, 0, 1)


def test_one_token_at_a_time_compresses_once_every_c_steps():
    memory, compressed = seq(0, 8), seq(0, 0)
    sizes = []
    for t in range(8, 20):
        memory, compressed, old, _ = update_layer_memory(memory, compressed, seq(t, 1), mem_len=8, c_mem_len=16,
                                                         rate=4, compress=sum_groups)
        sizes.append((memory.shape[1], compressed.shape[1], old is not None))
    # memory grows to mem_len + c - 1 = 11, then a whole group of 4 is compressed
    assert sizes[:4] == [(9, 0, False), (10, 0, False), (11, 0, False), (8, 1, True)]
    assert sizes[4:8] == [(9, 1, False), (10, 1, False), (11, 1, False), (8, 2, True)]
    assert compressed.flatten().tolist() == [0 + 1 + 2 + 3, 4 + 5 + 6 + 7, 8 + 9 + 10 + 11]


def test_odd_sizes_keep_the_remainder_until_a_whole_group():
    # mem_len 6 with segments of 5 and c = 4: overflow 4 after two segments
    memory, compressed = seq(0, 0), seq(0, 0)
    memory, compressed, _, _ = update_layer_memory(memory, compressed, seq(0, 5), mem_len=6, c_mem_len=8, rate=4,
                                                   compress=sum_groups)
    memory, compressed, old, _ = update_layer_memory(memory, compressed, seq(5, 5), mem_len=6, c_mem_len=8, rate=4,
                                                     compress=sum_groups)
    assert old.flatten().tolist() == [0, 1, 2, 3]
    assert memory.flatten().tolist() == [4, 5, 6, 7, 8, 9]
    memory, compressed, old, _ = update_layer_memory(memory, compressed, seq(10, 5), mem_len=6, c_mem_len=8, rate=4,
                                                     compress=sum_groups)
    assert old.flatten().tolist() == [4, 5, 6, 7]  # overflow 5: one group of 4, one waits
    assert memory.flatten().tolist() == [8, 9, 10, 11, 12, 13, 14]


def test_states_are_detached():
    hidden = seq(0, 8).requires_grad_()
    memory, compressed, _, _ = update_layer_memory(seq(0, 8), seq(0, 0), hidden * 2, mem_len=8, c_mem_len=4, rate=4,
                                                   compress=lambda old: old.view(1, -1, 4, 1).sum(2) * hidden.sum())
    assert not memory.requires_grad and not compressed.requires_grad


@settings(max_examples=60, deadline=None)
@given(mem_len=st.integers(0, 12), c_mem_len=st.integers(0, 12), rate=st.integers(1, 4),
       segments=st.lists(st.integers(1, 9), min_size=1, max_size=6))
def test_update_rule_invariants(mem_len, c_mem_len, rate, segments):
    """Lengths stay bounded, order is kept, nothing is lost except what the rule drops."""
    if c_mem_len:
        mem_len = rate * (mem_len // rate)
    memory, compressed = seq(0, 0), seq(0, 0)
    mv, cv = torch.ones(1, 0, dtype=torch.bool), torch.ones(1, 0, dtype=torch.bool)
    position = 0
    for length in segments:
        memory, compressed, old, fresh = update_layer_memory(
            memory, compressed, seq(position, length), mem_len=mem_len, c_mem_len=c_mem_len, rate=rate,
            compress=(lambda o: o.view(1, -1, rate, 1)[:, :, -1]) if c_mem_len else None)  # keep each group's newest
        mv, cv = update_validity(mv, cv, length, mem_len=mem_len, c_mem_len=c_mem_len, rate=rate)
        position += length
        values = memory.flatten().tolist()
        assert values == list(range(position - len(values), position))  # the newest, contiguous, in order
        assert memory.shape[1] <= mem_len + (rate - 1 if c_mem_len else 0)
        assert compressed.shape[1] <= c_mem_len
        assert mv.shape[1] == memory.shape[1] and cv.shape[1] == compressed.shape[1]
        kept = compressed.flatten().tolist()
        assert kept == sorted(kept) and all(v < position - len(values) for v in kept)
        if old is not None:
            assert old.shape[1] % rate == 0 and fresh.shape[1] == old.shape[1] // rate


def test_state_round_trip_and_reset():
    state = MemoryState((seq(0, 3, b=2),), (seq(0, 1, b=2),))
    assert state.key_valid() is None
    reset = state.reset(torch.tensor([False, True]))
    assert reset.key_valid().tolist() == [[True] * 4, [False] * 4]
    again = MemoryState.from_tensors(reset.to_tensors())
    assert again.key_valid().tolist() == reset.key_valid().tolist()
    assert torch.equal(again.memory[0], state.memory[0])
    assert MemoryState.from_tensors(state.to_tensors()).key_valid() is None


def test_a_state_saves_with_safetensors_as_its_own_tensors(tmp_path):
    """The memories are views of a segment's longer tensors: `to_tensors` gives each its own, so
    safetensors takes them and `torch.save` writes the memories alone."""
    from safetensors.torch import load_file, save_file

    longer = torch.randn(2, 1000, 8)  # a segment's inputs: the memory keeps its last 10 positions, a view
    state = MemoryState((longer[:, 990:],), (longer[:, :2],)).reset(torch.tensor([True, False]))
    save_file(state.to_tensors(), tmp_path / "state.safetensors")
    again = MemoryState.from_tensors(load_file(tmp_path / "state.safetensors"))
    assert torch.equal(again.memory[0], longer[:, 990:]) and again.key_valid().tolist() == state.key_valid().tolist()
    torch.save(state.to_tensors(), tmp_path / "state.pt")
    assert (tmp_path / "state.pt").stat().st_size < longer.nbytes
    row = MemoryState((longer[:1, 990:],), (longer[:1, :2],))  # batch 1: a contiguous view, of more
    torch.save(row.to_tensors(), tmp_path / "row.pt")
    assert (tmp_path / "row.pt").stat().st_size < longer.nbytes / 2
