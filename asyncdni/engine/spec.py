"""The run spec: everything a worker learns from the coordinator in the reply to HELLO.

A typed, frozen :class:`RunSpec` built once by the coordinator; :meth:`RunSpec.to_wire` is
the plain map that travels (msgpack), and :meth:`RunSpec.from_wire` checks that map as it
comes off the network (types, counts, the worker's own entries, CURVE keys, the
configuration) before anything reads it, so a malformed spec is one :class:`SpecError`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from asyncdni.config import RunConfig, from_dict, validate
from asyncdni.numerics.layer import LayerSpec
from asyncdni.wire import protocol as P
from asyncdni.wire import security


class SpecError(ValueError):
    """The run spec from the coordinator is unusable."""


@dataclass(frozen=True)
class NodeAddress:
    """Where one worker binds: its role, host and inbox ports (0: any free port)."""
    role: str
    host: str
    fwd_port: int = 0
    bwd_port: int = 0


@dataclass(frozen=True)
class ResumePoint:
    directory: str
    step: int


@dataclass(frozen=True)
class RunSpec:
    config: RunConfig
    nodes: tuple[NodeAddress, ...]      # the feeder, then one per layer
    specs: tuple[LayerSpec, ...]
    steps: int
    max_message: int
    checkpoint_dir: str = ""
    resume: ResumePoint | None = None
    curve_keys: tuple[str, ...] | None = None   # the run's workers' CURVE public keys (None: no CURVE)
    in_shape: tuple[int, ...] = ()      # the first layer's per-sample input (Plan.in_shape); (): (fan_in,)
    n_train: int = 0                    # training samples (Plan.n_train): the range of FWD sample ids

    @property
    def n_layers(self) -> int:
        return len(self.specs)

    def node_of(self, role: str, index: int) -> NodeAddress:
        return self.nodes[0 if role == "feeder" else index + 1]

    def to_wire(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "nodes": [dataclasses.asdict(n) for n in self.nodes],
            "specs": [dataclasses.asdict(s) for s in self.specs],
            "steps": self.steps, "max_message": self.max_message, "checkpoint_dir": self.checkpoint_dir,
            "resume": {"dir": self.resume.directory, "step": self.resume.step} if self.resume else None,
            "curve": {"keys": list(self.curve_keys)} if self.curve_keys is not None else None,
            "in_shape": list(self.in_shape), "n_train": self.n_train,
        }

    @classmethod
    def from_wire(cls, spec, role: str, index: int) -> "RunSpec":
        """Check a spec map that came over the network (for worker ``role`` ``index``) and build it."""
        if not isinstance(spec, dict):
            raise SpecError("run spec is not a map")
        need = {"config": dict, "nodes": list, "specs": list, "steps": int, "max_message": int,
                "checkpoint_dir": str}
        for k, t in need.items():
            if not isinstance(spec.get(k), t):
                raise SpecError(f"run spec: {k!r} missing or not a {t.__name__}")
        if role == "layer" and not 0 <= index < len(spec["specs"]):
            raise SpecError(f"run spec: no layer {index}")
        if len(spec["nodes"]) != len(spec["specs"]) + 1:
            raise SpecError("run spec: nodes do not match the layers")
        nodes = tuple(_node(n) for n in spec["nodes"])
        curve = spec.get("curve")
        if curve is not None and not (isinstance(curve, dict) and isinstance(curve.get("keys"), list)
                                      and all(security.valid_public_key(k) for k in curve["keys"])):
            raise SpecError("run spec: malformed CURVE key list")
        resume = spec.get("resume")
        if resume is not None:
            if not (isinstance(resume, dict) and isinstance(resume.get("dir"), str)
                    and type(resume.get("step")) is int and resume["step"] >= 0):
                raise SpecError("run spec: malformed resume entry")
            resume = ResumePoint(resume["dir"], resume["step"])
        if spec["steps"] < 1 or spec["max_message"] < 1:
            raise SpecError("run spec: steps and max_message must be positive")
        shape = spec.get("in_shape", [])
        if not (isinstance(shape, list) and len(shape) <= P.MAX_NDIM - 1 and all(type(d) is int and d >= 1 for d in shape)):
            raise SpecError(f"run spec: in_shape is not a list of 1 to {P.MAX_NDIM - 1} positive integers")
        n_train = spec.get("n_train", 0)
        if type(n_train) is not int or not 0 <= n_train <= 1 << 40:
            raise SpecError("run spec: n_train is not a sample count")
        config = validate(from_dict(spec["config"]))
        return cls(config=config, nodes=nodes, specs=tuple(_layer_spec(i, s) for i, s in enumerate(spec["specs"])),
                   steps=spec["steps"], max_message=spec["max_message"], checkpoint_dir=spec["checkpoint_dir"],
                   resume=resume, curve_keys=tuple(curve["keys"]) if curve is not None else None,
                   in_shape=tuple(shape), n_train=n_train)


def _node(entry) -> NodeAddress:
    if not (isinstance(entry, dict) and isinstance(entry.get("role"), str) and isinstance(entry.get("host"), str)):
        raise SpecError("run spec: nodes do not match the layers")
    ports = [entry.get(k, 0) for k in ("fwd_port", "bwd_port")]
    if any(type(p) is not int or not 0 <= p < 65536 for p in ports):
        raise SpecError(f"run spec: node {entry['role']!r} has a port out of range")
    return NodeAddress(entry["role"], entry["host"], *ports)


_LAYER_FIELDS = {f.name: f for f in dataclasses.fields(LayerSpec)}


def _layer_spec(i: int, entry) -> LayerSpec:
    if not isinstance(entry, dict):
        raise SpecError(f"run spec: layer {i} is not a map")
    unknown = set(entry) - set(_LAYER_FIELDS)
    if unknown:
        raise SpecError(f"run spec: layer {i} has unknown fields {sorted(unknown)}")
    # msgpack turns tuples into lists: tuple-typed fields come back as tuples
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in entry.items()}
    try:
        return LayerSpec(**values)
    except TypeError as e:
        raise SpecError(f"run spec: layer {i}: {e}") from None
