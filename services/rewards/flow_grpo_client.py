"""Client for reward servers written for flow_grpo (yifan123/reward-server and the ddpo-pytorch lineage).

Their protocol, as flow_grpo's ``flow_grpo/rewards.py`` speaks it::

    POST <url>   body = pickle.dumps({"images": [JPEG bytes], "prompts": [str], "meta_datas": [...],
                                      "only_strict": bool})          # only_strict: GenEval servers only
      → 200      body = pickle.dumps({"scores": [...], ...})         # the key varies: "scores", "outputs", ...
      → 500      traceback text                                      # any server-side exception

Differences from flow_grpo's own client, on purpose: a 500 is *not* retried (flow_grpo retries it up to
1000 times, which turns a deterministic server bug into a hang); retries, deadlines, batching and missing
scores follow :class:`drpo_core.rewards.remote.RemoteReward` like every other remote reward.
"""

from __future__ import annotations

import io
import pickle

from drpo_core.config import RewardConfig
from drpo_core.rewards.http import Batch, BatchFailure, HttpReward

# What an answer may contain: plain containers and numbers (opcodes, no lookup needed), numpy arrays and
# scalars, and a few harmless constructors. Everything else (os.system, eval, getattr, ...) is refused.
SAFE_GLOBALS = frozenset({
    ("builtins", name) for name in ("list", "dict", "tuple", "set", "frozenset", "float", "int", "str", "bytes",
                                    "bool", "complex")} | {
    ("collections", "OrderedDict"), ("collections", "defaultdict"), ("_codecs", "encode"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
})


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"answer references {module}.{name}, which a score answer never needs")
        return super().find_class(module, name)


def restricted_loads(data: bytes):
    return RestrictedUnpickler(io.BytesIO(data)).load()


class FlowGrpoReward(HttpReward):
    """A reward server that speaks flow_grpo's pickle-over-HTTP protocol (kind "flow_grpo").

    UNSAFE OUTSIDE A TRUSTED NETWORK. The protocol is pickle in both directions: whoever controls the
    server, or the network path to it (the protocol has no TLS, no auth and no schema), controls what this
    process unpickles. Answers are loaded with a restricted unpickler that only admits containers, numbers
    and numpy arrays, which stops the known code-execution payloads, but that is a mitigation, not a
    guarantee. Use it only for a server you run yourself on a network you trust, and only because you must
    reuse an existing flow_grpo server; prefer the JSON protocol (kind "http") or gRPC (kind "grpc"). The
    config must say ``allow_unsafe_pickle: true`` and so must the constructor.

    Options (``rewards[].options``): ``score_key`` ("scores"; "outputs" for the DeQA/UnifiedReward
    servers), ``only_strict`` (None = not sent; GenEval servers read it), ``jpeg_quality`` (75, PIL's
    default, which flow_grpo uses), ``backoff_s``, ``max_backoff_s``.
    """

    transport = "flow_grpo"
    content_type = "application/octet-stream"

    def __init__(self, url: str, allow_unsafe_pickle: bool = False, score_key: str = "scores",
                 only_strict: bool | None = None, jpeg_quality: int = 75, **kwargs):
        if not allow_unsafe_pickle:
            raise ValueError("FlowGrpoReward unpickles server answers; pass allow_unsafe_pickle=True only for a "
                             "server on a trusted network")
        if not 1 <= jpeg_quality <= 100:
            raise ValueError(f"FlowGrpoReward: jpeg_quality must be in 1..100, got {jpeg_quality}")
        super().__init__(url, **kwargs)
        self.score_key, self.only_strict, self.jpeg_quality = score_key, only_strict, jpeg_quality

    @classmethod
    def from_config(cls, cfg: RewardConfig) -> "FlowGrpoReward":
        return super().from_config(cfg, allow_unsafe_pickle=cfg.allow_unsafe_pickle)

    def _encode(self, batch: Batch) -> bytes:
        from torchvision.io import encode_jpeg

        images = [encode_jpeg(image.contiguous(), quality=self.jpeg_quality).numpy().tobytes()
                  for image in batch.images]
        body = {"images": images, "prompts": batch.prompts, "meta_datas": batch.metadata}
        if self.only_strict is not None:
            body["only_strict"] = self.only_strict
        return pickle.dumps(body, protocol=4)

    def _parse(self, content: bytes, n: int) -> list:
        try:
            answer = restricted_loads(content)
        except Exception as e:  # truncated, not a pickle, or a forbidden global
            raise BatchFailure(f"answer is not an acceptable pickle ({type(e).__name__}: {e})") from None
        if not isinstance(answer, dict):
            raise BatchFailure(f"answer is a {type(answer).__name__}, not a dict")
        if self.score_key not in answer:
            raise BatchFailure(f"answer has no {self.score_key!r} (keys: {sorted(map(str, answer))[:8]}; "
                               f"error: {str(answer.get('error', ''))[:120]})")
        scores = answer[self.score_key]
        scores = scores.tolist() if hasattr(scores, "tolist") else scores
        if not isinstance(scores, (list, tuple)) or len(scores) != n:
            raise BatchFailure(f"answer {self.score_key!r} is not a list of {n} scores")
        return list(scores)
