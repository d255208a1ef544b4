"""The official latent-MAE encoder φ of the SD-Turbo recipe (DrPO §1.6.4), on the official checkpoint layout.

Architecture (read from the official ``FrozenMAELatentFeatureExtractor``; re-implemented, not copied):

    stem:   h = ReLU(GN(conv3×3(x)))                                       key ``conv1``
    stage s (s = 0..S-1), block b (b = 0..layers[s]-1), stride 2 at b = 0 of s > 0:
            y = GN(conv3×3(ReLU(GN(conv3×3_stride(h)))))
            r = GN(conv1×1_stride(h)) if the shape changes else h             (projection shortcut)
            h = ReLU(r + y)                                                  key ``layer{s+1}_blk{b+1}`` every
                                                                             ``block_stride`` blocks (not the last)
            after the stage: h = GN(h)                                       key ``layer{s+1}``
    GN = GroupNorm(groups = the largest divisor of C that is <= 32, eps 1e-5); no conv has a bias.

Each key's map `[N, C, H, W]` gives ``_mean`` / ``_std`` `[N, 1, C]` (biased std, √(var + 1e-6)) and
``_mean_p`` / ``_std_p`` `[N, HW/p², C]` over non-overlapping p×p patches; ``norm_x`` `[N, 1, C_in]` is the
per-channel RMS of the input latent. The SD-Turbo recipe uses the six ``layer4`` keys.

Checkpoint: the official ``mae_latent_256_torch.pth`` — a ``torch.load(weights_only=True)``-able dict with
``state_dict`` (or ``model_state_dict``) and ``metadata.model_config`` {``layers``, ``in_channels``}, or a
bare tensor dict; ``.safetensors`` with the same keys also loads. Keys ``encoder.conv1.kernel``,
``encoder.gn1.scale``/``.bias``, ``encoder.stages_{s}.layers_{b}.{conv1,gn1,conv2,gn2,proj_conv,proj_gn}``,
``encoder.layer{s+1}_norm``; ``.weight`` may stand for ``.kernel``/``.scale``; ``module.``/``_orig_mod.``
prefixes are stripped; conv kernels in torch `[out, in, kh, kw]` or Flax `[kh, kw, in, out]` layout. The
architecture (blocks per stage from the metadata or the keys, widths and input channels from the shapes)
comes from the file, never from the config; every needed key is checked first and a missing or misshapen
one raises one ValueError line naming it.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from drpo_core.features.common import FeatureDict

RECIPE_KEYS = ("mean", "std", "mean_2", "std_2", "mean_4", "std_4")  # suffixes of the last stage's keys (drpo.sh)


def gn_groups(channels: int, max_groups: int = 32) -> int:
    """The largest divisor of ``channels`` that is at most ``max_groups`` (the official rule)."""
    groups = min(max_groups, channels)
    while groups > 1 and channels % groups:
        groups -= 1
    return max(groups, 1)


def safe_std(x: torch.Tensor, dim) -> torch.Tensor:
    return (x.var(dim=dim, unbiased=False) + 1e-6).sqrt()


# -- reading a checkpoint --------------------------------------------------------------------------------
def read_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """``(state, metadata)`` of an official-layout file, prefixes stripped; ValueError on an unreadable file."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"features.checkpoint {path!r} does not exist")
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            raw, meta = load_file(str(file)), {}
        except (OSError, SafetensorError) as e:
            raise ValueError(f"features.checkpoint {path!r} is not a readable safetensors file: {str(e).splitlines()[0]}") from None
    else:
        try:  # weights_only: tensors and plain containers, never arbitrary pickled objects
            obj = torch.load(str(file), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
            raise ValueError(f"features.checkpoint {path!r} is not a weights-only torch file: {str(e).splitlines()[0]}") from None
        raw, meta = _unwrap(obj, path)
    state = {}
    for key, value in raw.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        state[key] = value
    return state, meta


def _unwrap(obj, path: str) -> tuple[dict[str, torch.Tensor], dict]:
    if isinstance(obj, dict):
        for name in ("state_dict", "model_state_dict"):
            if isinstance(obj.get(name), dict):
                meta = obj.get("metadata")
                return obj[name], meta if isinstance(meta, dict) else {}
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj, {}
    raise ValueError(f"features.checkpoint {path!r}: expected a dict with 'state_dict' or 'model_state_dict' "
                     "(official latent-MAE layout) or a dict of tensors")


def _get(state: dict, prefix: str, names: tuple[str, ...]) -> tuple[str, torch.Tensor]:
    for name in names:
        if f"{prefix}.{name}" in state:
            return f"{prefix}.{name}", state[f"{prefix}.{name}"]
    raise ValueError(f"features.checkpoint: missing key {prefix}.{names[0]} (or {prefix}.{names[1]})")


def _conv(state: dict, prefix: str, c_in: int, size: int) -> torch.Tensor:
    """Kernel of ``prefix`` in torch layout `[out, in, k, k]`, from either layout (Flax: in at dim 2)."""
    key, k = _get(state, prefix, ("kernel", "weight"))
    if k.ndim == 4 and k.shape[2] == c_in and k.shape[:2] == (size, size):
        k = k.permute(3, 2, 0, 1)  # Flax [kh, kw, in, out] → [out, in, kh, kw]
    elif not (k.ndim == 4 and k.shape[1] == c_in and k.shape[2:] == (size, size)):
        raise ValueError(f"features.checkpoint: key {key} has shape {tuple(k.shape)}, expected a {size}x{size} kernel "
                         f"with {c_in} input channels ([out, {c_in}, {size}, {size}] or [{size}, {size}, {c_in}, out])")
    return k.float().contiguous()


def _norm(state: dict, prefix: str, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    out = []
    for names in (("scale", "weight"), ("bias", "beta")):
        key, v = _get(state, prefix, names)
        if tuple(v.shape) != (channels,):
            raise ValueError(f"features.checkpoint: key {key} has shape {tuple(v.shape)}, expected ({channels},)")
        out.append(v.float().contiguous())
    return out[0], out[1]


def block_counts(state: dict, meta: dict) -> list[int]:
    """Blocks per stage: ``metadata.model_config.layers``, else counted from the keys."""
    layers = (meta.get("model_config") or {}).get("layers")
    if layers:
        return [int(n) for n in layers]
    counts: dict[int, int] = {}
    for key in state:
        m = re.match(r"encoder\.stages_(\d+)\.layers_(\d+)\.", key)
        if m:
            counts[int(m.group(1))] = max(counts.get(int(m.group(1)), 0), int(m.group(2)) + 1)
    if not counts:
        raise ValueError("features.checkpoint: missing key encoder.stages_0.layers_0.conv1.kernel (no encoder stages found)")
    return [counts.get(s, 0) for s in range(max(counts) + 1)]


def torch_layout_params(state: dict, meta: dict) -> tuple[dict[str, torch.Tensor], list[int], int]:
    """Check every key the forward needs; return ``(params in torch layout, layers, in_channels)``."""
    layers = block_counts(state, meta)
    _, stem = _get(state, "encoder.conv1", ("kernel", "weight"))
    in_channels = (meta.get("model_config") or {}).get("in_channels")
    if in_channels is None:  # Flax [3, 3, in, out] or torch [out, in, 3, 3]
        in_channels = stem.shape[2] if stem.ndim == 4 and stem.shape[:2] == (3, 3) and stem.shape[2] <= 16 else stem.shape[1]
    in_channels = int(in_channels)
    p: dict[str, torch.Tensor] = {}
    p["encoder.conv1"] = _conv(state, "encoder.conv1", in_channels, 3)
    c = p["encoder.conv1"].shape[0]
    p["encoder.gn1.scale"], p["encoder.gn1.bias"] = _norm(state, "encoder.gn1", c)
    for s, n_blocks in enumerate(layers):
        for b in range(n_blocks):
            pre = f"encoder.stages_{s}.layers_{b}"
            p[f"{pre}.conv1"] = _conv(state, f"{pre}.conv1", c, 3)
            c_out = p[f"{pre}.conv1"].shape[0]
            p[f"{pre}.gn1.scale"], p[f"{pre}.gn1.bias"] = _norm(state, f"{pre}.gn1", c_out)
            p[f"{pre}.conv2"] = _conv(state, f"{pre}.conv2", c_out, 3)
            if p[f"{pre}.conv2"].shape[0] != c_out:
                raise ValueError(f"features.checkpoint: key {pre}.conv2 has {p[f'{pre}.conv2'].shape[0]} output channels, expected {c_out}")
            p[f"{pre}.gn2.scale"], p[f"{pre}.gn2.bias"] = _norm(state, f"{pre}.gn2", c_out)
            if c_out != c or (s > 0 and b == 0):  # the shape changes: projection shortcut
                p[f"{pre}.proj_conv"] = _conv(state, f"{pre}.proj_conv", c, 1)
                p[f"{pre}.proj_gn.scale"], p[f"{pre}.proj_gn.bias"] = _norm(state, f"{pre}.proj_gn", c_out)
            c = c_out
        p[f"encoder.layer{s + 1}_norm.scale"], p[f"encoder.layer{s + 1}_norm.bias"] = _norm(state, f"encoder.layer{s + 1}_norm", c)
    return p, layers, in_channels


def random_official_state(in_channels: int, width: int, layers: list[int], seed: int, flax: bool = False) -> dict[str, torch.Tensor]:
    """A seeded random encoder in the official key layout (width·2^s channels in stage s): the full-size
    stand-in when no checkpoint is given, and what the tests write to disk. He-normal convs, GN scale 1, bias 0."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def conv(name: str, c_in: int, c_out: int, k: int) -> None:
        w = torch.randn(c_out, c_in, k, k, generator=g) * (2.0 / (c_out * k * k)) ** 0.5
        state[f"{name}.kernel"] = w.permute(2, 3, 1, 0).contiguous() if flax else w

    def norm(name: str, c: int) -> None:
        state[f"{name}.scale"] = 1 + 0.1 * torch.randn(c, generator=g)
        state[f"{name}.bias"] = 0.1 * torch.randn(c, generator=g)

    conv("encoder.conv1", in_channels, width, 3)
    norm("encoder.gn1", width)
    c = width
    for s, n_blocks in enumerate(layers):
        c_out = width * 2**s
        for b in range(n_blocks):
            pre = f"encoder.stages_{s}.layers_{b}"
            conv(f"{pre}.conv1", c, c_out, 3), norm(f"{pre}.gn1", c_out)
            conv(f"{pre}.conv2", c_out, c_out, 3), norm(f"{pre}.gn2", c_out)
            if c_out != c or (s > 0 and b == 0):
                conv(f"{pre}.proj_conv", c, c_out, 1), norm(f"{pre}.proj_gn", c_out)
            c = c_out
        norm(f"encoder.layer{s + 1}_norm", c)
    return state


class LatentMAEEncoder(nn.Module):
    """Frozen official latent-MAE φ: latents `[N, C_in, h, w]` → ``{key: [N, L, D]}`` for the chosen keys."""

    def __init__(self, params: dict[str, torch.Tensor], layers: list[int], in_channels: int, keys: list[str] | None = None,
                 block_stride: int = 2, patch_sizes: tuple[int, ...] = (2, 4), include_norm_x: bool = False):
        super().__init__()
        self.layers, self.in_channels, self.block_stride = list(layers), in_channels, max(int(block_stride), 0)
        self.patch_sizes = tuple(sorted({int(p) for p in patch_sizes if int(p) > 1}))
        self.include_norm_x = include_norm_x
        self._names = {}
        for key, value in params.items():  # buffers: they follow .to(device) and never train
            self._names[key] = key.replace(".", "__")
            self.register_buffer(self._names[key], value, persistent=False)
        last = f"layer{len(layers)}"
        self.keys = list(keys) if keys else [f"{last}_{suffix}" for suffix in RECIPE_KEYS]
        self.default_keys = not keys
        unknown = [k for k in self.keys if k not in self.available_keys()]
        if unknown:
            raise ValueError(f"features.keys: {unknown[0]!r} is not a latent-MAE key; available: {', '.join(self.available_keys())}")
        self.requires_grad_(False)
        self.eval()

    def _p(self, key: str) -> torch.Tensor:
        return getattr(self, self._names[key])

    def map_names(self) -> list[str]:
        names = ["conv1"]
        for s, n in enumerate(self.layers):
            if self.block_stride:
                names += [f"layer{s + 1}_blk{b}" for b in range(self.block_stride, n, self.block_stride)]
            names.append(f"layer{s + 1}")
        return names

    def available_keys(self) -> list[str]:
        keys = ["norm_x"] if self.include_norm_x else []
        for name in self.map_names():
            keys += [f"{name}_mean", f"{name}_std"] + [f"{name}_{m}_{p}" for p in self.patch_sizes for m in ("mean", "std")]
        return keys

    def map_sizes(self, h: int, w: int) -> dict[str, tuple[int, int]]:
        """Spatial size of each named map for `[h, w]` latents: a stride-2 block (3×3, padding 1; or the 1×1
        shortcut) maps a side n to ⌈n/2⌉."""
        sizes, size = {"conv1": (h, w)}, (h, w)
        for s, n_blocks in enumerate(self.layers):
            for b in range(n_blocks):
                if s > 0 and b == 0:
                    size = (-(-size[0] // 2), -(-size[1] // 2))
                if self.block_stride and (b + 1) % self.block_stride == 0 and b + 1 < n_blocks:
                    sizes[f"layer{s + 1}_blk{b + 1}"] = size
            sizes[f"layer{s + 1}"] = size
        return sizes

    def check_latent_size(self, h: int, w: int) -> None:
        """One ValueError line, at build time, for a key that `[h, w]` latents cannot give (a p×p patch key needs
        its map's sides divisible by p): otherwise the first update would fail deep inside the learner."""
        sizes = self.map_sizes(h, w)
        defined = {"norm_x"} | {f"{n}_{m}" for n in sizes for m in ("mean", "std")}
        defined |= {f"{n}_{m}_{p}" for n, (H, W) in sizes.items() for p in self.patch_sizes if not (H % p or W % p)
                    for m in ("mean", "std")}
        for key in self.keys:
            if key not in defined:
                name = next(n for n in sorted(sizes, key=len, reverse=True) if key.startswith(n + "_"))
                H, W = sizes[name]
                usable = [k for k in self.keys if k in defined] or [f"{name}_mean", f"{name}_std"]
                p = key.rsplit("_", 1)[-1]
                default = " (the default keys: the SD-Turbo recipe's, for 64x64 latents)" if self.default_keys else ""
                raise ValueError(f"features.keys: {key!r} is not defined for {(h, w)} latents: {name} maps are {H}x{W}, "
                                 f"not divisible into {p}x{p} patches{default}; set features.keys, e.g. {usable}, "
                                 "or raise model.resolution")

    def _gn(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        return F.group_norm(x, gn_groups(x.shape[1]), self._p(f"{prefix}.scale"), self._p(f"{prefix}.bias"), eps=1e-5)

    def feature_maps(self, latents: torch.Tensor) -> dict[str, torch.Tensor]:
        """The named maps `[N, C, H, W]` (stem, every ``block_stride``-th block, each stage after its GN)."""
        if latents.ndim != 4 or latents.shape[1] != self.in_channels:
            raise ValueError(f"latent-MAE expects [N, {self.in_channels}, h, w] latents, got {tuple(latents.shape)}")
        stem = self._p("encoder.conv1")  # fp32 buffers; .double() for oracle checks (the official casts to the kernel dtype)
        h = F.relu(self._gn(F.conv2d(latents.to(stem.dtype), stem, padding=1), "encoder.gn1"))
        maps = {"conv1": h}
        for s, n_blocks in enumerate(self.layers):
            for b in range(n_blocks):
                pre, stride = f"encoder.stages_{s}.layers_{b}", 2 if (s > 0 and b == 0) else 1
                y = F.relu(self._gn(F.conv2d(h, self._p(f"{pre}.conv1"), stride=stride, padding=1), f"{pre}.gn1"))
                y = self._gn(F.conv2d(y, self._p(f"{pre}.conv2"), padding=1), f"{pre}.gn2")
                if f"{pre}.proj_conv" in self._names:
                    h = self._gn(F.conv2d(h, self._p(f"{pre}.proj_conv"), stride=stride), f"{pre}.proj_gn")
                h = F.relu(h + y)
                if self.block_stride and (b + 1) % self.block_stride == 0 and b + 1 < n_blocks:
                    maps[f"layer{s + 1}_blk{b + 1}"] = h
            h = self._gn(h, f"encoder.layer{s + 1}_norm")
            maps[f"layer{s + 1}"] = h
        return maps

    def forward(self, latents: torch.Tensor) -> FeatureDict:
        wanted = set(self.keys)
        out: FeatureDict = {}
        if "norm_x" in wanted:
            out["norm_x"] = latents.to(self._p("encoder.conv1").dtype).square().mean(dim=(2, 3)).sqrt()[:, None]
        for name, fmap in self.feature_maps(latents).items():
            if not any(k.startswith(name + "_") for k in wanted):
                continue
            N, C, H, W = fmap.shape
            out[f"{name}_mean"] = fmap.mean(dim=(2, 3))[:, None]
            out[f"{name}_std"] = safe_std(fmap, (2, 3))[:, None]
            for p in self.patch_sizes:
                if H % p or W % p:
                    continue
                patches = fmap.reshape(N, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1).reshape(N, -1, p * p, C)
                out[f"{name}_mean_{p}"] = patches.mean(dim=2)
                out[f"{name}_std_{p}"] = safe_std(patches, 2)
        missing = [k for k in self.keys if k not in out]
        if missing:
            raise ValueError(f"features.keys: {missing[0]!r} is not defined for {tuple(latents.shape[2:])} latents")
        return {k: out[k] for k in self.keys}


def build_latent_mae(cfg, in_channels: int) -> LatentMAEEncoder:
    """From ``features.checkpoint`` (architecture from the file), or a seeded random full-size stand-in."""
    if cfg.checkpoint:
        state, meta = read_checkpoint(cfg.checkpoint)
        try:
            params, layers, ckpt_in = torch_layout_params(state, meta)
        except ValueError as e:
            raise ValueError(str(e).replace("features.checkpoint:", f"features.checkpoint {cfg.checkpoint!r}:", 1)) from None
        if ckpt_in != in_channels:
            raise ValueError(f"features.checkpoint {cfg.checkpoint!r} takes {ckpt_in}-channel latents; the model makes {in_channels}")
    else:
        layers = list(cfg.stage_blocks)
        params, layers, _ = torch_layout_params(random_official_state(in_channels, cfg.width, layers, cfg.seed), {"model_config": {"layers": layers}})
    return LatentMAEEncoder(params, layers, in_channels, keys=cfg.keys, block_stride=cfg.block_stride,
                            patch_sizes=tuple(cfg.patch_sizes), include_norm_x=cfg.include_norm_x)
