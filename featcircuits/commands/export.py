"""``featcircuits export DIR --format F``: re-export a saved circuit folder in one format."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError

#: format -> default file name inside the circuit folder
CLI_FORMATS = {
    "graphml": "graph.graphml",
    "dot": "graph.dot",
    "json": "graph.json",
    "circuit-tracer": "graph.circuit-tracer.json",
    "html": "circuit.html",
    "png": "circuit.png",
    "svg": "circuit.svg",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="re-export a saved circuit folder (GraphML, DOT, JSON, circuit-tracer JSON, HTML viewer, PNG, SVG)",
        description="Load a circuit folder written by `featcircuits discover` (graph.json, "
                    "node_effects.safetensors, summary.json) and write it in one format. png/svg draw "
                    "the circuit with matplotlib (layers bottom to top); add --graphviz to render the "
                    "DOT with the Graphviz `dot` binary instead.")
    p.add_argument("dir", metavar="DIR", help="circuit folder (holds graph.json)")
    p.add_argument("--format", "-f", required=True, metavar="FORMAT",
                   help="one of: " + ", ".join(CLI_FORMATS))
    p.add_argument("--out", "-o", default=None, metavar="PATH",
                   help="output file, or an existing folder; default: in DIR, " + ", ".join(CLI_FORMATS.values()))
    p.add_argument("--max-nodes", type=int, default=200,
                   help="png/svg: draw at most this many nodes, largest |effect| first (default 200)")
    p.add_argument("--graphviz", action="store_true",
                   help="png/svg: render graph.dot with the Graphviz `dot` binary instead of matplotlib")
    p.set_defaults(func=run)


def output_path(dir_: Path, fmt: str, out: str | None, graphviz: bool = False) -> Path:
    default = CLI_FORMATS[fmt]
    if graphviz:
        default = f"graph.{fmt}"
    if out is None:
        return dir_ / default
    path = Path(out)
    if path.is_dir():
        return path / default
    if fmt in ("png", "svg") and path.suffix.lower() != f".{fmt}":
        raise UserError(f"--out {out} must end in .{fmt} for --format {fmt}")
    if fmt == "html" and path.suffix.lower() not in (".html", ".htm"):
        raise UserError(f"--out {out} must end in .html for --format html")
    if fmt == "circuit-tracer" and path.suffix.lower() != ".json":
        raise UserError(f"--out {out} must end in .json (circuit-tracer's front end loads <slug>.json)")
    return path


def run(args: argparse.Namespace) -> int:
    from .. import export

    fmt = args.format.strip().lower()
    if fmt not in CLI_FORMATS:
        raise UserError(f"unknown format {args.format!r}: choose one of {', '.join(CLI_FORMATS)}")
    if args.graphviz and fmt not in ("png", "svg"):
        raise UserError("--graphviz only applies to --format png or svg")
    if args.max_nodes is not None and args.max_nodes < 1:
        raise UserError(f"--max-nodes must be at least 1, got {args.max_nodes}")
    src = Path(args.dir)
    circuit = export.load_circuit(src)
    out = output_path(src, fmt, args.out, args.graphviz)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "graphml":
        export.write_graphml(circuit, out)
    elif fmt == "dot":
        export.write_dot(circuit, out)
    elif fmt == "json":
        export.write_json_graph(circuit, out)
    elif fmt == "circuit-tracer":
        export.write_circuit_tracer(circuit, out, cards=export.read_cards(src))
    elif fmt == "html":
        export.write_circuit_html(circuit, out, export.read_cards(src))
    elif args.graphviz:
        if not export.graphviz_available():
            raise UserError("the Graphviz `dot` binary is not installed (apt-get install graphviz); "
                            "drop --graphviz to draw with matplotlib")
        dot = src / export.DOT
        if not dot.exists():
            dot = out.with_suffix(".dot")
            export.write_dot(circuit, dot)
        export.render_dot(dot, out, fmt)
    else:
        from ..draw import draw_circuit

        out = draw_circuit(circuit, out, max_nodes=args.max_nodes, formats=(fmt,))[0]
    print(f"wrote {out} ({circuit.n_nodes} nodes, {circuit.n_edges} edges)")
    return 0
