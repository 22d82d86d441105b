"""``featcircuits evaluate``: faithfulness and completeness of one saved circuit.

Reads a circuit folder (``featcircuits.export.load_circuit``), rebuilds its model,
dictionaries and discovery pairs from the provenance, draws evaluation pairs disjoint from
the discovery pairs, and ablates everything outside the circuit (and, for completeness,
the circuit itself). Writes ``evaluation.json`` into the circuit folder (or ``--out``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import load_model_from_args, add_batch_size_arg, add_device_args, check_dictionaries_early
from .curves import add_eval_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="faithfulness and completeness of a saved circuit on held-out examples",
        description="Ablate every node outside the circuit (mean / zero / resample) on evaluation pairs "
                    "disjoint from the discovery pairs and report F(C), F(M), F(empty), faithfulness "
                    "and completeness.")
    p.add_argument("--circuit", required=True, help="circuit folder written by `featcircuits discover`")
    p.add_argument("--n", type=int, default=None,
                   help="evaluation pairs (default: as many as the circuit was discovered on)")
    p.add_argument("--model", default=None, help="override the model recorded in the circuit's provenance")
    p.add_argument("--saes", default=None, help="override the dictionaries recorded in the provenance")
    p.add_argument("--task", default=None, help="override the task recorded in the provenance")
    p.add_argument("--seed", type=int, default=None, help="override the discovery seed recorded in the provenance")
    add_batch_size_arg(p)
    add_eval_args(p)
    add_device_args(p)
    p.add_argument("--out", default=None, help="JSON file to write (default: CIRCUIT/evaluation.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation at --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..dictionaries import load_dictionary_set
    from ..errors import UserError
    from ..evaluation import evaluate_circuit
    from ..export import load_circuit

    from ..validation import check_output_file

    circuit = load_circuit(args.circuit)
    out = check_output_file(args.out or Path(args.circuit) / "evaluation.json", overwrite=args.overwrite)
    prov = circuit.provenance or {}
    model_spec = args.model or prov.get("model")
    saes = args.saes or prov.get("saes") or prov.get("dictionaries")
    task = args.task or prov.get("task")
    missing = [k for k, v in (("model", model_spec), ("saes", saes), ("task", task)) if not v]
    if missing:
        flags = " ".join(f"--{k} {k.upper()}" for k in missing)
        raise UserError(f"{args.circuit} does not record its {', '.join(missing)} (a circuit saved without them): "
                        f"add {flags} (or save it with save_circuit(..., model=, task=, saes=))")
    check_dictionaries_early(model_spec, saes)
    model = load_model_from_args(args, model_spec)
    dicts = load_dictionary_set(saes, model.adapter, model_spec)
    result = evaluate_circuit(model, dicts, circuit, task=task, n_eval=args.n, seed=args.seed,
                              ablation=args.ablation, errors=args.errors, start_layer=args.start_layer,
                              batch_size=args.batch_size, stack=args.stack, progress=not args.no_progress)
    result["provenance"].update({"model": model_spec, "saes": saes})
    from ..io import write_json

    write_json(out, result)
    r = result
    print(f"circuit {args.circuit}: {r['n_nodes']} nodes at the evaluated sites "
          f"({r['settings']['ablation']} ablation, errors {r['settings']['errors']}, "
          f"{r['split']['n_eval']} held-out pairs)")
    print(f"  F(C) {r['F_C']:+.4f}   F(M) {r['F_M']:+.4f}   F(empty) {r['F_empty']:+.4f}   F(M\\C) {r['F_complement']:+.4f}")
    print(f"  faithfulness {r['faithfulness']:.4f}   completeness {r['completeness']:.4f}   -> {out}")
    return 0
