"""The broadcast's layout and group without Ray: several buckets, a sender and two receivers (gloo, threads)."""

import threading
from datetime import timedelta

import pytest
import torch

from drpo_core.training import weight_broadcast
from drpo_core.training.weight_broadcast import BroadcastGroup, Layout, layout_of


def state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"b.weight": torch.randn(7, 5, generator=g), "a.bias": torch.randn(3, generator=g),
            "c.weight": torch.randn(2, 3, 4, generator=g), "d": torch.randn(11, generator=g)}


def test_layout_packs_sorted_tensors_into_bounded_buckets_and_round_trips_the_cast(monkeypatch):
    monkeypatch.setattr(weight_broadcast, "BUCKET_BYTES", 40 * 2)  # 40 float16 values per bucket
    s = state()
    layout = layout_of(s, torch.float16)
    assert [e[0] for e in layout.entries] == sorted(s)
    assert len(layout.bucket_sizes) == 2 and all(n <= 40 for n in layout.bucket_sizes[:-1])  # 3+35 | 24+11
    back = layout.unflatten(layout.flatten(s))
    for k, v in s.items():
        assert back[k].dtype == torch.float16 and torch.equal(back[k], v.half()), k
    assert layout.digest == layout_of({k: v.clone() for k, v in s.items()}, torch.float16).digest
    assert layout.digest != layout_of({**s, "d": torch.randn(12)}, torch.float16).digest  # another architecture
    with pytest.raises(TypeError, match="floating-point"):
        layout.flatten({**s, "d": torch.arange(11)})


def test_a_gloo_broadcast_gives_every_receiver_the_senders_buckets_and_a_lost_receiver_raises(monkeypatch):
    monkeypatch.setattr(weight_broadcast, "BUCKET_BYTES", 40 * 2)
    s = state()
    layout, timeout = Layout.of({k: tuple(v.shape) for k, v in s.items()}, torch.float16), timedelta(seconds=8)
    store = BroadcastGroup.serve_store("127.0.0.1", 3, timeout)
    got, errors = {}, []

    def member(rank: int, world: int, epoch: int) -> None:
        try:
            st = store if rank == 0 else BroadcastGroup.connect_store("127.0.0.1", store.port, world, timeout)
            group = BroadcastGroup(st, rank, world, "gloo", timeout, epoch)
            buckets = layout.flatten(s) if rank == 0 else layout.empty()
            group.broadcast(buckets)
            got[(epoch, rank)] = layout.unflatten(buckets)
        except Exception as e:  # noqa: BLE001
            errors.append((epoch, rank, e))

    threads = [threading.Thread(target=member, args=(r, 3, 1)) for r in range(3)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert not errors
    for r in (1, 2):
        assert all(torch.equal(got[(1, r)][k], s[k].half()) for k in s)
    # epoch 2 is a new group on the same store: a receiver that never joins makes the others fail within the timeout
    timeout = timedelta(seconds=3)
    threads = [threading.Thread(target=member, args=(r, 3, 2)) for r in range(2)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert not any(t.is_alive() for t in threads) and {e[1] for e in errors} == {0, 1}


def test_weight_sync_options_are_validated_once_in_one_line():
    from drpo_core.config import ConfigError, load_config
    from services.runtime.weight_sync import sync_dtype, sync_mode

    with pytest.raises(ConfigError, match=r"^runtime.weight_sync: Input should be 'auto', 'object_store' or 'collective'$"):
        load_config([], ["runtime.weight_sync=nccl"])
    with pytest.raises(ConfigError, match="weight_sync_dtype float16 cannot hold the range of bfloat16"):
        load_config([], ["model.dtype=bfloat16", "runtime.weight_sync_dtype=float16"])
    assert sync_mode(load_config([], ["lora.enabled=false"])) == "collective"
    assert sync_mode(load_config([], ["runtime.weight_sync=collective"])) == "collective"  # a LoRA may use it too
    assert sync_dtype(load_config([], ["model.dtype=bfloat16"])) == torch.bfloat16
    assert sync_dtype(load_config([], [])) == torch.float32  # auto: the model's dtype, exact (tests/test_ray_parity.py)
    assert sync_dtype(load_config([], ["runtime.weight_sync_dtype=float16"])) == torch.float16  # half the bytes, rounded
