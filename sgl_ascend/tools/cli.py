"""The `sgl-ascend` console script.

    sgl-ascend inspect PATH [--tp N] [--ep N] [--device-memory GIB] [--mem-fraction F]
                       [--kv-cache-dtype int8 [--kv-cache-skip-layers 0,-1]] [--json]
    sgl-ascend verify PATH [--reference BF16_PATH] [--tp N] [--ep N] [--threshold X] [--min-top1 F] [--prompts ...]
                      [--perplexity] [--json]
    sgl-ascend selftest [--json]
    sgl-ascend schemes [--json]

Exit codes: 0 fine; 1 verify (or selftest) found errors above the threshold; 2 the checkpoint cannot be served
as it is (a CheckpointError, printed with file, tensor and what to do).
"""

import argparse
import json
import sys
from typing import List, Optional

from sgl_ascend.errors import CheckpointError, printable

EXIT_OK, EXIT_ABOVE_THRESHOLD, EXIT_CHECKPOINT_ERROR = 0, 1, 2
_LIST_LIMIT = 10


def _bytes(n: Optional[int]) -> str:
    if n is None:
        return "?"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _table(rows: List[List[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _listing(title: str, items: List[dict], fmt) -> List[str]:
    if not items:
        return []
    lines = [f"{title} ({len(items)}):"]
    lines += [f"  {fmt(i)}" for i in items[:_LIST_LIMIT]]
    if len(items) > _LIST_LIMIT:
        lines.append(f"  ... and {len(items) - _LIST_LIMIT} more (see --json)")
    return lines


def format_plan(plan) -> str:
    data = plan.to_json()
    mem = data["memory"]
    per_dev = f"per device (tp={plan.tp}, ep={plan.ep})"
    rows = [["layers", "module", "scheme", "bf16", "on disk", "resident", per_dev]]
    for g in data["groups"]:
        rows.append([g["layers"], g["module"], g["scheme"] + (" (ERROR)" if g["error"] else ""),
                     _bytes(g["bf16_bytes"]), _bytes(g["disk_bytes"]), _bytes(g["resident_bytes"]),
                     _bytes(g["resident_bytes_per_device"])])
    f = data["float_tensors"]
    rows.append(["-", "embeddings, norms, lm_head, router", "FLOAT", _bytes(f["bf16_bytes"]),
                 _bytes(f["disk_bytes"]), _bytes(f["resident_bytes"]), _bytes(f["resident_bytes_per_device"])])
    rows.append(["", "total", "", _bytes(mem["bf16_bytes"]), _bytes(mem["disk_bytes"]),
                 _bytes(mem["resident_bytes"]), _bytes(mem["resident_bytes_per_device"])])
    lines = [f"{plan.path}", f"format: {plan.format}   model: {plan.model_type}", "", _table(rows), ""]
    if mem["resident_over_bf16"] is not None:
        lines.append(f"resident / bf16: {mem['resident_over_bf16']:.3f} whole model, "
                     f"{mem['quantized_layers_resident_over_bf16'] or 1.0:.3f} quantized layers")
    kv = data["kv_cache"]
    if kv:
        side = kv["bytes_per_token_per_device"] - kv["pool_bytes_per_token_per_device"]
        mode = (", online: --kv-cache-dtype int8" if kv.get("online") else "") + (
            f", layers {kv['skip_layers']} kept in bf16" if kv.get("skip_layers") else "")
        lines.append(f"KV cache: {kv['scheme']} ({kv['cache_dtype']}{mode}), {kv['bytes_per_token_per_device']} "
                     f"bytes per token per device (bf16 KV: {kv['bf16_bytes_per_token_per_device']})")
        if side:
            lines.append(f"  of which SGLang's pool {kv['pool_bytes_per_token_per_device']} (int8 K/V of every layer) "
                         f"and {side} in the backend's buffers beside it (per-token fp32 scales"
                         + (", skipped layers' bf16 K/V)" if kv.get("skip_layers") else ")"))
    if getattr(plan, "fit", None):
        fit = plan.fit
        lines.append(f"on a device of {_bytes(fit['device_bytes'])} at mem fraction {fit['mem_fraction']}: weights "
                     f"{_bytes(fit['weight_bytes'])}, KV budget {_bytes(fit['kv_budget_bytes'])}, tokens "
                     f"{fit['tokens']} ({kv['cache_dtype']} KV) vs {fit['tokens_bf16_kv']} (bf16 KV)")
        if fit["sglang_pool_tokens"] != fit["tokens"]:
            lines.append(f"  SGLang sizes its pool by the pool bytes alone: {fit['sglang_pool_tokens']} tokens, and "
                         "the buffers beside it come on top of the mem fraction")
    lines += [f"note: {n}" for n in plan.notes]
    lines += _listing("ignored tensors (in the checkpoint, deliberately not loaded)", data["ignored"],
                      lambda i: f"{i['tensor']}: {i['reason']}")
    lines += _listing("missing tensors", data["missing"], lambda i: f"{i['tensor']} (layer {i['layer']})")
    lines += _listing("unused tensors (no layer takes them)", data["unused"], lambda i: i["tensor"])
    lines += _listing("errors", [{"e": e} for e in data["errors"]], lambda i: i["e"])
    lines.append("OK: every layer can be served" if plan.ok else
                 f"NOT SERVABLE as is: {len(plan.errors)} error(s)")
    return "\n".join(lines)


def cmd_inspect(args) -> int:
    from sgl_ascend.tools.plan import plan_checkpoint, tokens_that_fit

    plan = plan_checkpoint(args.path, tp=args.tp, ep=args.ep, kv_cache_dtype=args.kv_cache_dtype,
                           kv_cache_skip_layers=args.kv_cache_skip_layers)
    plan.fit = (tokens_that_fit(plan, int(args.device_memory * 2 ** 30), args.mem_fraction)
                if args.device_memory else None)
    data = {**plan.to_json(), "fit": plan.fit}
    print(json.dumps(data, indent=2) if args.json else format_plan(plan))
    return EXIT_OK if plan.ok else EXIT_CHECKPOINT_ERROR


def format_verify(report, threshold: float, min_top1: float) -> str:
    data = report.to_json()
    tp = report.tp > 1
    rows = [["layer", "scheme", "rel. error", "output err vs ref", "weight err vs ref", "resident", "theoretical"]
            + ([f"tp={report.tp} vs tp=1"] if tp else [])]
    for layer in data["layers"]:
        w, r, t = layer["weight_rel_error"], layer["ref_output_error"], layer["tp_error"]
        rows.append([layer["prefix"], layer["scheme"], f"{layer['rel_error']:.4f}", "-" if r is None else f"{r:.4f}",
                     "-" if w is None else f"{w:.4f}", _bytes(layer["resident_bytes"]),
                     _bytes(layer["theoretical_bytes"])] + (["-" if t is None else f"{t:.4f}"] if tp else []))
    lines = [f"{report.path} against {report.reference or 'its own dequantization'}", "",
             "per-layer relative error, worst first (rel. error: served vs the checkpoint's own dequantized layer on "
             "the inputs its float model gives it; output err vs ref: served vs the reference model's layer output, "
             "unchanged by smoothing, includes earlier layers' drift; weight err vs ref: informative, smoothing "
             "moves weights):", _table(rows), ""]
    for p in data["prompts"]:
        lines.append(f"prompt {p['prompt'][:40]!r}: top-1 {p['top1_agree']}/{p['tokens']}, "
                     f"logit rel. error {p['logit_rel_error']:.4f}")
    lines += [f"note: {n}" for n in report.notes]
    if report.quality:
        from sgl_ascend.tools.quality import format_quality

        lines += [""] + format_quality(report.quality) + [""]
    ref = report.worst_ref_output_error
    lines.append(f"worst layer error {report.worst_layer_error:.4f}"
                 + f" (threshold {threshold}), top-1 agreement {report.top1_agreement:.3f} (minimum {min_top1})"
                 + ("" if ref is None else f"; worst output error vs reference {ref:.4f} (informative)"))
    if report.worst_tp_error is not None:
        lines.append(f"tp={report.tp} ep={report.ep}: worst difference of the ranks' output put together vs tp=1 "
                     f"{report.worst_tp_error:.4f} (threshold {threshold})")
    return "\n".join(lines)


def verify_passed(report, threshold: float, min_top1: float) -> bool:
    tp_error = report.worst_tp_error
    return (report.worst_layer_error <= threshold and report.top1_agreement >= min_top1
            and (tp_error is None or tp_error <= threshold))


def cmd_verify(args) -> int:
    from sgl_ascend.tools.verify import DEFAULT_PROMPTS, verify_checkpoint

    report = verify_checkpoint(args.path, args.reference, args.prompts or DEFAULT_PROMPTS,
                               progress=False if args.json else None, tp=args.tp, ep=args.ep,
                               quality=args.perplexity)
    passed = verify_passed(report, args.threshold, args.min_top1)
    if args.json:
        print(json.dumps({**report.to_json(), "threshold": args.threshold, "min_top1": args.min_top1,
                          "passed": passed}, indent=2))
    else:
        print(format_verify(report, args.threshold, args.min_top1))
        print("PASS" if passed else "FAIL: above threshold")
    return EXIT_OK if passed else EXIT_ABOVE_THRESHOLD


def cmd_selftest(args) -> int:
    from sgl_ascend.tools.selftest import checks_json, device_for_selftest, format_checks, run_selftest

    device = device_for_selftest()
    checks = run_selftest(device)
    passed = all(c.passed for c in checks)
    if args.json:
        print(json.dumps({"device": device or "cpu (twin vs reference)", "checks": checks_json(checks),
                          "passed": passed}, indent=2))
    else:
        print(f"device: {device or 'none (CPU host): each twin against an independent float reference'}")
        print(format_checks(checks))
    return EXIT_OK if passed else EXIT_ABOVE_THRESHOLD


def format_schemes(rows) -> str:
    """rows: sgl_ascend.layers.registry.served_table(); one line per (format, kind, name)."""
    table = [["format", "kind", "scheme", "served by"]] + [list(r) for r in rows]
    return _table(table) + "\nKV-cache schemes: none served yet (a quantized KV cache is refused at start-up)" \
        if not any(r[1] == "kv_cache" for r in rows) else _table(table)


def format_variants(rows) -> str:
    """rows: sgl_ascend.layers.registry.served_variants()."""
    if not rows:
        return ""
    table = [["format", "kind", "scheme", "when the key has", "served by"]] + [list(r) for r in rows]
    return "\n\nvariants (a layout the format writes under the same name):\n" + _table(table)


def cmd_schemes(args) -> int:
    from sgl_ascend.layers.registry import served_table, served_variants

    rows = served_table()
    if args.json:
        print(json.dumps([dict(zip(("format", "kind", "name", "class"), r)) for r in rows], indent=2))
    else:
        print(format_schemes(rows) + format_variants(served_variants()))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sgl-ascend", description="Inspect and verify quantized checkpoints "
                                     "(msModelSlim, compressed-tensors) before serving them on Ascend NPUs.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="format, schemes per layer, missing/ignored tensors, memory (headers only)")
    p.add_argument("path")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size for the per-device column")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (divides --tp)")
    p.add_argument("--device-memory", type=float, metavar="GIB",
                   help="predict the KV tokens that fit on a device of this memory (bf16 vs the checkpoint's KV)")
    p.add_argument("--mem-fraction", type=float, default=0.9,
                   help="share of the device memory for weights + KV pool (SGLang's --mem-fraction-static)")
    p.add_argument("--kv-cache-dtype", choices=["auto", "int8"], default=None,
                   help="as the server's flag: int8 on a checkpoint without KV scales models the online int8 KV "
                        "cache (int8 K/V + per-token fp32 scales)")
    p.add_argument("--kv-cache-skip-layers", metavar="0,1,-1",
                   help="as the server's flag, with --kv-cache-dtype int8: these layers keep bf16 K/V")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)
    v = sub.add_parser("verify", help="load through the serving layers on CPU and measure errors")
    v.add_argument("path")
    v.add_argument("--reference", help="the original bf16 model folder (default: the checkpoint's own "
                                       "dequantization)")
    v.add_argument("--tp", type=int, default=1, help="also build every layer for N tensor-parallel ranks (in this "
                                                     "process) and check their outputs put together equal tp=1's")
    v.add_argument("--ep", type=int, default=1, help="expert-parallel size with --tp (divides --tp)")
    v.add_argument("--threshold", type=float, default=0.25,
                   help="largest per-layer relative error accepted (default 0.25). Seen on the tiny fixtures: "
                        "int8 layers 0.01-0.04; int4 activations 0.12-0.17; int4 weights against --reference "
                        "~0.2")
    v.add_argument("--min-top1", type=float, default=0.8, help="smallest top-1 token agreement accepted")
    v.add_argument("--prompts", nargs="+", help="prompts for the logit comparison")
    v.add_argument("--perplexity", action="store_true",
                   help="also report perplexity on a built-in English passage, greedy agreement, outlier channels "
                        "and the weight vs activation split of the loss, with msmodelslim advice (needs a tokenizer)")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_verify)
    s = sub.add_parser("selftest", help="every NPU op and scheme layer on this device vs the CPU twin (on a CPU "
                                        "host: twin vs float reference); run it first on a new NPU host")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_selftest)
    r = sub.add_parser("schemes", help="every scheme sgl-ascend serves, per format and kind (from the registry)")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_schemes)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CheckpointError as exc:
        print(f"sgl-ascend {args.command}: checkpoint error: {_printable(exc)}", file=sys.stderr)
        return EXIT_CHECKPOINT_ERROR
    except ValueError as exc:  # bad arguments, e.g. --ep not dividing --tp
        print(f"sgl-ascend {args.command}: {_printable(exc)}", file=sys.stderr)
        return EXIT_CHECKPOINT_ERROR


def _printable(exc) -> str:
    """The message, line by line, with whatever a terminal cannot print (file names that are not UTF-8,
    control characters) escaped."""
    return "\n".join(printable(line) for line in str(exc).split("\n"))


if __name__ == "__main__":
    sys.exit(main())
