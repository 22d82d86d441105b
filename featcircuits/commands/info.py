"""``featcircuits info``: the model's family, sites, and the dictionary at each site."""

from __future__ import annotations

import argparse
import json

from . import load_model_from_args, add_model_args, default_saes


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show a model's sites and the dictionaries found for them",
                       description="Load a model (and a dictionary set) and list every site with its width.")
    add_model_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..dictionaries import load_dictionary_set

    model = load_model_from_args(args)
    saes = default_saes(args.model, args.saes)
    dicts = load_dictionary_set(saes, model.adapter, args.model)
    a = model.adapter
    rows = [{"site": s.name, "module": s.path, "reads": "input" if s.reads_input else "output",
             "d_in": dicts[s.name].d_in, "width": dicts[s.name].d_sae,
             "dictionary": dicts[s.name].source} for s in a.sites(dicts.z_sites())]
    info = {"model": args.model, "family": a.family, "layers": a.n_layers, "d_model": a.d_model,
            "parallel_attn_mlp": a.parallel, "vocab": len(model.tokenizer), "dictionaries": dicts.name,
            "identity_sites": dicts.meta.get("identity_sites", []), "sites": rows,
            "load_seconds": model.info.get("load_seconds")}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model       {args.model}  ({a.family}, {a.n_layers} layers, d_model {a.d_model}, "
          f"{'parallel' if a.parallel else 'sequential'} attention/MLP)")
    print(f"dictionaries {dicts.name}  ({len(rows)} sites)")
    width = max(len(r["site"]) for r in rows)
    for r in rows:
        print(f"  {r['site']:<{width}}  width {r['width']:>6}  {r['dictionary']:<30}  {r['module']}"
              f"{' (input: hook_z)' if r['reads'] == 'input' else ''}")
    return 0
