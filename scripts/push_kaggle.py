"""Push the train notebook to Kaggle as a kernel that runs exactly this checkout's code, and resumes.

    python scripts/push_kaggle.py --fresh             # first push: nothing to resume from yet
    python scripts/push_kaggle.py                     # later pushes: continue from the last version's output
    python scripts/push_kaggle.py --dry-run -p epochs=30 -p img_size=448

It builds build/kaggle/ (kernel-metadata.json + the notebook), checks it, then runs
`kaggle kernels push -p build/kaggle`:
- parameters are baked in with papermill: env=kaggle, --run-name, and every -p NAME=VALUE;
- dcal_lib travels inside the notebook (a base64 zip extracted onto sys.path by the first code cell) with
  the git commit in DCAL_CODE_VERSION, so a kernel never runs code other than what was pushed;
- kernel_sources lists the kernel itself, so version N+1 mounts version N's /kaggle/working and the run
  continues from its last.pt. --resume-from OWNER/SLUG (a kernel) or dataset:OWNER/SLUG takes that output
  instead, for when Kaggle refuses a kernel that reads its own output.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nbformat
from papermill.iorw import load_notebook_node
from papermill.parameterize import parameterize_notebook
from slugify import slugify

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from dcal_lib.config import ConfigError, make_config  # noqa: E402

MIN_CLI = (1, 8, 4)  # older CLIs drop machine_shape and the kernel silently gets a P100
PLACEHOLDER = "your-kaggle-username"
SOURCE_TAG = "dcal-source"
NOTEBOOK = REPO / "notebooks" / "train.ipynb"
SLUG = re.compile(r"^[A-Za-z0-9_-]+/[a-z0-9][a-z0-9-]*$")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="build and check build/kaggle, do not push")
    p.add_argument("--run-name", default="dcal", help="folder in /kaggle/working/runs (default dcal)")
    p.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                   help="a Config parameter baked into the notebook (repeatable)")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--fresh", action="store_true",
                        help="attach no previous output: the first push, or starting the run over")
    resume.add_argument("--resume-from", metavar="[dataset:]OWNER/SLUG",
                        help="resume from this kernel's (or dataset's) output instead of this kernel's own")
    p.add_argument("--metadata", type=Path, default=REPO / "kernel-metadata.json")
    p.add_argument("--build-dir", type=Path, default=REPO / "build" / "kaggle")
    return p.parse_args(argv)


def baked_parameters(run_name: str, pairs: list[str]) -> dict:
    """env=kaggle, the run name and the -p values, typed and validated by Config before anything is built."""
    params = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            sys.exit(f"push_kaggle: -p {pair!r}: expected NAME=VALUE")
        params[name.strip()] = value
    if {"env", "run_name"} & set(params):
        sys.exit("push_kaggle: env is always kaggle here and the run name is set with --run-name")
    try:
        cfg = make_config(env="kaggle", run_name=run_name, **params)
    except ConfigError as e:
        sys.exit(f"push_kaggle: {e}")
    return {"env": "kaggle", "run_name": run_name, **{name: getattr(cfg, name) for name in params}}


def git_version(code: bytes) -> str:
    """The commit; when dcal_lib or notebooks differ from it, "-dirty-" and a digest of the shipped code."""
    def git(*args):
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "HEAD") or "unknown"
    if git("status", "--porcelain", "--", "dcal_lib", "notebooks"):
        return f"{commit}-dirty-{hashlib.sha256(code).hexdigest()[:12]}"
    return commit


def package_zip() -> bytes:
    """dcal_lib's sources as a deterministic zip (fixed timestamps), so the same code gives the same bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted((REPO / "dcal_lib").rglob("*.py")):
            info = zipfile.ZipInfo(path.relative_to(REPO).as_posix(), date_time=(2020, 1, 1, 0, 0, 0))
            z.writestr(info, path.read_bytes(), zipfile.ZIP_DEFLATED)
    return buf.getvalue()


def source_cell(code: bytes, version: str) -> nbformat.NotebookNode:
    payload = base64.encodebytes(code).decode()
    source = f'''# dcal_lib as pushed by scripts/push_kaggle.py ({version}), put first on sys.path
# so that this kernel runs exactly the pushed code whatever else is installed.
import base64, io, os, sys, tempfile, zipfile

_code_dir = tempfile.mkdtemp(prefix="dcal_lib_")
zipfile.ZipFile(io.BytesIO(base64.b64decode(_DCAL_LIB_ZIP))).extractall(_code_dir)
sys.path.insert(0, _code_dir)
os.environ["DCAL_CODE_VERSION"] = "{version}"
print(f"dcal_lib {{os.environ['DCAL_CODE_VERSION']}} from {{_code_dir}}")
'''
    cell = nbformat.v4.new_code_cell(f'_DCAL_LIB_ZIP = """\n{payload}"""\n' + source)
    cell.metadata["tags"] = [SOURCE_TAG]
    cell.metadata["jupyter"] = {"source_hidden": True}
    return cell


def build_notebook(params: dict, code: bytes, version: str) -> nbformat.NotebookNode:
    """notebooks/train.ipynb with the parameters injected after its `parameters` cell and the code first."""
    nb = parameterize_notebook(load_notebook_node(str(NOTEBOOK)), params)
    nb.metadata.pop("jupytext", None)
    first_code = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
    nb.cells.insert(first_code, source_cell(code, version))
    return nb


def kernel_metadata(template: dict, fresh: bool, resume_from: str | None) -> dict:
    meta = {**template, "dataset_sources": list(template.get("dataset_sources", [])), "kernel_sources": []}
    if resume_from and resume_from.startswith("dataset:"):
        meta["dataset_sources"].append(resume_from.removeprefix("dataset:"))
    elif resume_from:
        meta["kernel_sources"] = [resume_from]
    elif not fresh:
        meta["kernel_sources"] = [meta.get("id", "")]
    return meta


def check_metadata(meta: dict, build_dir: Path) -> tuple[list[str], list[str]]:
    """(errors, placeholder problems): what `kaggle kernels push` would reject or run wrongly."""
    errors = []
    kid, title = str(meta.get("id", "")), str(meta.get("title", ""))
    if not SLUG.match(kid):
        errors.append(f"id {kid!r} is not OWNER/slug (slug: lowercase letters, digits, hyphens)")
    if len(title) < 5:
        errors.append(f"title {title!r} is shorter than 5 characters")
    elif slugify(title) != kid.partition("/")[2]:
        errors.append(f"title {title!r} slugifies to {slugify(title)!r}, not to the id's slug")
    code_file = str(meta.get("code_file", ""))
    if not code_file.endswith(".ipynb") or not (build_dir / code_file).is_file():
        errors.append(f"code_file {code_file!r}: expected the notebook's file name (*.ipynb) in {build_dir}")
    for key, want in (("language", "python"), ("kernel_type", "notebook"), ("enable_gpu", True)):
        if meta.get(key) != want:
            errors.append(f"{key} is {meta.get(key)!r}, expected {want!r}")
    if not meta.get("machine_shape"):
        errors.append('machine_shape is not set: "NvidiaTeslaT4" selects GPU T4 x2')
    if not isinstance(meta.get("enable_internet"), bool):
        errors.append("enable_internet must be set explicitly to true or false (W&B and weights need true)")
    for key in ("dataset_sources", "kernel_sources"):
        errors += [f"{key} entry {s!r} is not OWNER/slug" for s in meta.get(key, []) if not SLUG.match(s)]
    placeholders = [
        f"{key} {value!r} still names {PLACEHOLDER!r}: edit {key} in kernel-metadata.json"
        for key in ("id", "dataset_sources")
        for value in (meta.get(key) if isinstance(meta.get(key), list) else [meta.get(key)])
        if PLACEHOLDER in str(value)
    ]
    return errors, placeholders


def kaggle_cli(dry_run: bool) -> str | None:
    """The kaggle executable (PATH, then beside this Python), refused when older than MIN_CLI."""
    exe = shutil.which("kaggle") or shutil.which("kaggle", path=str(Path(sys.executable).parent))
    if exe is None:
        if dry_run:
            print("warning: kaggle CLI not found; install it with pip install 'kaggle>=1.8.4' before pushing")
            return None
        sys.exit("push_kaggle: kaggle CLI not found on PATH: pip install 'kaggle>=1.8.4'")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", out.stdout + out.stderr)
    if not match:
        sys.exit(f"push_kaggle: cannot read a version from `{exe} --version`: {(out.stdout + out.stderr)!r}")
    version = tuple(int(g or 0) for g in match.groups())
    if version < MIN_CLI:
        sys.exit(
            f"push_kaggle: {exe} is version {'.'.join(map(str, version))}; machine_shape needs >= "
            f"{'.'.join(map(str, MIN_CLI))} (older ones silently run on a P100): pip install -U kaggle"
        )
    return exe


def describe(meta: dict, params: dict, version: str, code: bytes, build_dir: Path) -> str:
    inputs = ", ".join(meta["kernel_sources"]) or "none (a fresh run)"
    if meta["id"] in meta["kernel_sources"]:
        inputs += " (its previous version's output: the run resumes from its last.pt)"
    rows = [
        ("kernel", f"{meta['id']} ({'private' if meta.get('is_private') else 'PUBLIC'}), "
                   f"https://www.kaggle.com/code/{meta['id']}"),
        ("machine", f"{meta['machine_shape']}{' = GPU T4 x2' * (meta['machine_shape'] == 'NvidiaTeslaT4')}, "
                    f"internet {'on' if meta['enable_internet'] else 'off'}"),
        ("datasets", ", ".join(meta["dataset_sources"]) or "none"),
        ("inputs", inputs),
        ("parameters", ", ".join(f"{k}={v!r}" for k, v in params.items())),
        ("code", f"{version} ({len(code) // 1024} KiB of dcal_lib embedded)"),
        ("outputs", f"/kaggle/working/runs/{params['run_name']}"),
        ("built", str(build_dir)),
    ]
    return "\n".join(f"{k:<11} {v}" for k, v in rows)


def main(argv=None) -> None:
    args = parse_args(argv)
    params = baked_parameters(args.run_name, args.param)
    exe = kaggle_cli(args.dry_run)
    code = package_zip()
    version = git_version(code)
    try:
        template = json.loads(args.metadata.read_text())
    except (OSError, json.JSONDecodeError) as e:
        sys.exit(f"push_kaggle: cannot read {args.metadata}: {e}")
    meta = kernel_metadata(template, args.fresh, args.resume_from)

    args.build_dir.mkdir(parents=True, exist_ok=True)
    code_file = str(meta.get("code_file", ""))
    if code_file.endswith(".ipynb"):  # else check_metadata says what is wrong
        nbformat.write(build_notebook(params, code, version), args.build_dir / code_file)
    (args.build_dir / "kernel-metadata.json").write_text(json.dumps(meta, indent=2) + "\n")

    errors, placeholders = check_metadata(meta, args.build_dir)
    if placeholders and args.dry_run:
        print("\n".join(f"warning: {p}" for p in placeholders))
    else:
        errors += placeholders
    if errors:
        sys.exit("push_kaggle: " + args.metadata.name + ":\n  " + "\n  ".join(errors))
    print(describe(meta, params, version, code, args.build_dir))
    if args.dry_run:
        print("dry run: nothing pushed")
        return
    result = subprocess.run([exe, "kernels", "push", "-p", str(args.build_dir)])
    if result.returncode:
        hint = "" if args.fresh else " (first push? add --fresh; self-reference refused? see --resume-from)"
        sys.exit(f"push_kaggle: kaggle kernels push failed with exit code {result.returncode}{hint}")


if __name__ == "__main__":
    main()
