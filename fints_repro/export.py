"""A run's user-level steering vectors, for other tools:

    python -m fints_repro.export --out DIR [--method NAME] [--formats safetensors,gguf] OVERRIDE ...

``OVERRIDE``s are the run's (``+exp=demo steering.sites=[resid]``), ``--method`` one of its
methods (``rag+caa(ours)``; needless where the run has one); the vectors come from the run's cache (pairs and per-pair vectors are computed first where the
run has not made them). Written into ``DIR``:

- ``vectors.safetensors``: one ``[H]`` tensor per user and site, named
  ``<user>/layer<L>.<site>``, as added to the model (strengths applied), with a JSON
  header (``__metadata__["fints_repro"]``: the model, its source, the layer, the sites,
  the positions, the users and the method's settings): any site, any method whose vector
  is the same for every row of a user (user-level: CAA, BiPO; not Fints, which chooses
  vectors per input);
- ``<user>.gguf`` (residual-stream vectors only, added at every position): a control
  vector in the layout of repeng's ``export_gguf``, which llama.cpp's ``--control-vector``
  reads: the architecture ``controlvector``, ``controlvector.model_hint`` (the model
  type) and ``controlvector.layer_count``, one float32 tensor ``direction.<L>`` per
  layer, ``<L>`` the 0-based decoder layer whose output it is added to (llama.cpp adds
  ``direction.<L>`` after its layer ``L``; it has no direction 0).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from fints_repro import stages
from fints_repro.backbones import build_backbone
from fints_repro.cache import atomic_file, make_dir
from fints_repro.compose import resolve_methods
from fints_repro.errors import ConfigError, FintsError

log = logging.getLogger("fints_repro.export")
FORMATS = ("safetensors", "gguf")


def user_vectors(plan: Any, samples: list) -> dict[str, dict[tuple[int, str], torch.Tensor]]:
    """{user: {(layer, site): vector}} from a plan's rows; a ConfigError where two rows of
    one user hold different vectors (the method chooses per input)."""
    out: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    for i, s in enumerate(samples):
        if not plan.steered[i]:
            continue
        mine = out.setdefault(s.user, {})
        for key, v in plan.vectors.items():
            if key in mine and not torch.equal(mine[key], v[i]):
                raise ConfigError(
                    f"export: the rows of user {s.user!r} hold different vectors at layer "
                    f"{key[0]} {key[1]}: the method chooses its vectors per input, and export "
                    "writes one vector per user (steering=caa or bipo)")
            mine[key] = v[i].detach().to(torch.float32).cpu()
    return out


def write_safetensors(path: Path, vectors: dict[str, dict[tuple[int, str], torch.Tensor]],
                      meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    tensors = {f"{u}/layer{layer}.{site}": v.contiguous()
               for u, by_site in sorted(vectors.items()) for (layer, site), v in sorted(by_site.items())}
    with atomic_file(path, "exported steering vectors") as tmp:
        save_file(tensors, str(tmp), metadata={"fints_repro": json.dumps(meta, sort_keys=True)})


def write_gguf(path: Path, directions: dict[int, torch.Tensor], model_hint: str) -> None:
    import gguf

    arch = "controlvector"
    with atomic_file(path, "the GGUF control vector") as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_string(f"{arch}.model_hint", model_hint)
        writer.add_uint32(f"{arch}.layer_count", len(directions))
        for layer, v in sorted(directions.items()):
            writer.add_tensor(f"direction.{layer}", v.numpy().astype("float32"))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def pick_method(cfg: Any, overrides: list[str], name: str | None) -> Any:
    """The run's method ``name`` (a preset's ``methods:``), or the config's own."""
    methods = resolve_methods(cfg, overrides)
    if name is None and len(methods) == 1:
        method = methods[0]
    else:
        by_name = {m.name: m for m in methods}
        if name not in by_name:
            raise ConfigError(f"export --method {name!r}: the run's methods are {sorted(by_name)}; "
                              "name the steered one (--method)")
        method = by_name[name]
    if method.steering.name == "none":
        raise ConfigError(f"export: method {method.name!r} is unsteered (steering=none): no vectors")
    return method


def export(overrides: list[str], out: Path, formats: list[str],
           method_name: str | None = None) -> dict[str, list[Path]]:
    ctx = stages.open_run(overrides)
    method = pick_method(ctx.cfg, overrides, method_name)
    st = method.steering
    lm = ctx.model(None)
    backbone = build_backbone(method.backbone, ctx.task, ctx.retriever)
    try:
        steered_lm = stages.fit(ctx, method, backbone, lm)
        plan = stages.steering_plan(ctx, method, backbone, steered_lm)
    finally:
        backbone.close(lm)
    if plan is None or not any(plan.steered):
        raise ConfigError(f"export: steering={st.name} made no vector for any user "
                          "(no pairs were kept): nothing to export")
    vectors = user_vectors(plan, ctx.samples)
    layers = sorted({k[0] for k in plan.vectors})
    sites = sorted({k[1] for k in plan.vectors})
    meta = {"model": lm.fingerprint, "model_source": lm.source, "layers": layers, "sites": sites,
            "positions": plan.positions, "users": sorted(vectors),
            "method": st.name, "backbone": method.backbone.name,
            "recipe": {k: getattr(st, k) for k in
                       ("alpha", "beta", "gamma", "scale", "positions", "attn_read")}
            | {"pairs": {"attempts": st.pairs.attempts,
                         "prompt_layout": st.pairs.prompt_layout}}}
    if "gguf" in formats and (sites != ["resid"] or plan.positions != "all"):
        raise ConfigError(
            f"export --formats gguf: a llama.cpp control vector is added to the residual "
            f"stream at every position; this run's vectors are at {sites} "
            f"(positions={plan.positions}). Export with steering.sites=[resid] "
            "steering.positions=all, or --formats safetensors")
    if "gguf" in formats and 0 in layers:
        raise ConfigError("export --formats gguf: llama.cpp has no control vector for layer 0 "
                          "(steering.layer=0)")
    make_dir(out, "export --out")
    written: dict[str, list[Path]] = {f: [] for f in formats}
    if "safetensors" in formats:
        path = out / "vectors.safetensors"
        write_safetensors(path, vectors, meta)
        written["safetensors"].append(path)
    if "gguf" in formats:
        hint = getattr(lm.model.config, "model_type", "") or lm.name
        for user, by_site in sorted(vectors.items()):
            path = out / f"{user}.gguf"
            write_gguf(path, {layer: v for (layer, _), v in by_site.items()}, hint)
            written["gguf"].append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fints_repro.export",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--method", default=None,
                    help="which of the run's methods (a preset's methods:) to export")
    ap.add_argument("--formats", default=",".join(FORMATS),
                    help=f"comma-separated, of {', '.join(FORMATS)}")
    ap.add_argument("overrides", nargs="*", help="the run's Hydra overrides")
    args = ap.parse_args(argv)
    formats = [f for f in args.formats.split(",") if f]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        ap.error(f"--formats {args.formats!r}: expected a comma-separated list of {', '.join(FORMATS)}")
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
    try:
        written = export(args.overrides, args.out, formats, args.method)
    except FintsError as e:
        log.error("%s", e)
        return 2
    for fmt, paths in written.items():
        print(f"{fmt}: {len(paths)} file(s) in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
