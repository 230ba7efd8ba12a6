"""Architecture suite table: per zoo model, whether the per-instance route (m=1, m=2) and the exact Gram
rule equal a loop over instances, refuse by name, differ silently or crash.

    OMP_NUM_THREADS=1 python benchmarks/architectures.py [--cases bert gpt2 ...] [--modes m1 m2 exact] [--out FILE]
                                                         [--library-commit REV]

The zoo, the references and the verdicts are ``tests/architectures.py`` (the test is ``tests/test_architectures.py``,
``pytest -m architectures``). Every model is tiny, random-init, float64; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _library_from_commit(argv: list[str]) -> str | None:
    """``--library-commit REV``: import lightning_deltasam as it was at REV (git archive into a temporary folder)."""
    if "--library-commit" not in argv:
        return None
    import subprocess
    import tempfile

    rev = argv[argv.index("--library-commit") + 1]
    folder = tempfile.mkdtemp(prefix="arch-lib-")
    archive = subprocess.run(["git", "archive", rev, "lightning_deltasam"], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", folder], input=archive.stdout, check=True)
    sys.path.insert(0, folder)
    return rev


LIBRARY_COMMIT = _library_from_commit(sys.argv)

import torch  # noqa: E402

import lightning_deltasam  # noqa: E402
from tests.architectures import MODES, NOT_IN_ZOO, TOLERANCE, ZOO, run_case  # noqa: E402


def _library_version() -> str:
    """The commit the library was measured at, and whether lightning_deltasam/ had local changes."""
    import subprocess

    if LIBRARY_COMMIT is not None:
        head = subprocess.run(["git", "rev-parse", "--short", LIBRARY_COMMIT], cwd=ROOT, capture_output=True, text=True)
        return f"commit {head.stdout.strip()} (git archive, imported from {Path(lightning_deltasam.__file__).parent})"

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "lightning_deltasam"], cwd=ROOT, capture_output=True, text=True
        ).stdout
    except OSError:
        return "unknown (no git)"
    changed = [line[3:] for line in dirty.splitlines()]
    return f"commit {head.strip()}" + (f" + local changes in {', '.join(changed)}" if changed else " (clean)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", help="zoo names (default: all); a name matches its /T=B case too")
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES))
    parser.add_argument("--out", default=None, help="also write the markdown here")
    parser.add_argument("--library-commit", default=None, help="measure lightning_deltasam as it was at this commit")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        pass
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    version = _library_version()  # before the run: the working tree may change while it runs
    names = [n for n in ZOO if not args.cases or n in args.cases or n.split("/")[0] in args.cases]
    header = "| model | case | " + " | ".join(args.modes) + " |"
    lines = [header, "|" + "---|" * (2 + len(args.modes))]
    print(header, flush=True)
    print(lines[1], flush=True)
    counts: dict[str, dict[str, int]] = {m: {} for m in args.modes}
    start = time.perf_counter()
    for name in names:
        model_type, _, case = name.partition("/")
        case = case or ("B=4, T=7, padded" if name not in ("vit", "resnet") else "B=4 images")
        if name.endswith("-lm-tied"):
            case = "causal LM, tied head, B=4, T=7, padded"
        elif case == "T=B":
            case = "B=T=5, padded" + (", causal LM, tied head" if "lm-tied" in model_type else "")
        cells = []
        for mode in args.modes:
            outcome = run_case(name, mode)
            counts[mode][outcome.kind] = counts[mode].get(outcome.kind, 0) + 1
            cells.append(outcome.cell())
        line = f"| {model_type} | {case} | " + " | ".join(cells) + " |"
        lines.append(line)
        print(line, flush=True)
    elapsed = time.perf_counter() - start
    summary = [
        "",
        f"Library: {version}.",
        f"{len(names)} cases, tolerance {TOLERANCE:g} (relative, all trainable parameters), {elapsed:.0f} s, "
        f"torch {torch.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}.",
        "",
        "| mode | " + " | ".join(k for k in ("equal", "refused", "vague", "silent", "crash")) + " |",
        "|---|---|---|---|---|---|",
    ]
    for mode in args.modes:
        summary.append(
            f"| {mode} | "
            + " | ".join(str(counts[mode].get(k, 0)) for k in ("equal", "refused", "vague", "silent", "crash"))
            + " |"
        )
    summary += ["", "Model types with a sequence-classification head not in the zoo:", ""]
    summary += [f"- `{k}`: {v}" for k, v in NOT_IN_ZOO.items()]
    print("\n".join(summary), flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines + summary) + "\n")


if __name__ == "__main__":
    main()
