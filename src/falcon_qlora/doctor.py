"""One screen on whether this machine can run a config, to read before spending GPU hours or paste into a bug report.

    falcon-qlora doctor                          # checks for the reference recipe
    falcon-qlora doctor --config demo            # ... or any preset / YAML, with the same overrides as `train`

GPU, compute capability and bf16; a real bitsandbytes 4-bit matmul on the device; library versions against
falcon-qlora's requirements and known-bad combinations; free disk against the run's checkpoints; GPU memory against
`estimate`; hub reachability. Exit status 1 when a run of the config would fail.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import warnings
from pathlib import Path

from .config import RunConfig
from .errors import UserError

OK, INFO, WARN, FAIL = "ok", "info", "warn", "FAIL"
HUB_TIMEOUT_S = 3.0
PACKAGES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "huggingface-hub")


def _version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def _requirements() -> dict[str, str]:
    """falcon-qlora's own version ranges: its installed metadata, or pyproject.toml when it runs from a checkout
    without being installed."""
    from importlib.metadata import PackageNotFoundError, requires
    from packaging.requirements import Requirement
    try:
        reqs = [Requirement(r) for r in requires("falcon-qlora") or []]
    except PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
        if not pyproject.is_file():
            return {}
        import tomllib
        reqs = [Requirement(r) for r in tomllib.loads(pyproject.read_text())["project"]["dependencies"]]
    return {r.name.lower(): str(r.specifier) for r in reqs if r.marker is None}


def check_versions(cfg: RunConfig, model_type: str | None) -> list[tuple[str, str]]:
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version
    out, fine, reqs = [], [], _requirements()
    for pkg in PACKAGES:
        v, spec = _version(pkg), reqs.get(pkg)
        if v is None:
            out.append((FAIL if spec is not None else WARN, f"{pkg} is not installed: pip install '{pkg}{spec or ''}'"))
        elif spec and Version(v) not in SpecifierSet(spec):
            out.append((FAIL, f"{pkg} {v} is outside falcon-qlora's range {spec}: pip install '{pkg}{spec}'"))
        else:
            fine.append(f"{pkg} {v}")
    out.insert(0, (OK, ", ".join(fine)))
    tf, trl = _version("transformers"), _version("trl")
    if tf and trl and Version(tf).release[:2] == (5, 4) and Version(trl).release[:2] == (1, 16):
        bad = cfg.gradient_accumulation_steps > 1
        out.append((FAIL if bad else WARN, f"transformers {tf} with trl {trl} scales gradients wrongly under gradient "
                    f"accumulation (4x too small at 4 steps): pip install 'transformers>=5.5'"))
    if tf and Version(tf) >= Version("5.5") and model_type == "falcon" and cfg.load_in_4bit:
        out.append((INFO, f"transformers {tf} alone would load Falcon unquantized (FalconLinear is not converted to "
                    "4-bit); falcon-qlora fixes this while loading and counts the Linear4bit layers"))
    return out


def check_device(cfg: RunConfig) -> list[tuple[str, str]]:
    import torch
    out = [(OK, f"python {platform.python_version()} on {platform.platform(terse=True)}")]
    if not torch.cuda.is_available():
        out.append((INFO, "no CUDA GPU: this machine trains small local models only (falcon-qlora demo)"))
    else:
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            major, minor = torch.cuda.get_device_capability(i)
            out.append((OK, f"GPU {i}: {torch.cuda.get_device_name(i)}, compute capability {major}.{minor}, "
                        f"{total / 2**30:.1f} GiB ({free / 2**30:.1f} free), "
                        f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no (training uses fp16)'}"))
    try:
        from .model import resolve_compute_dtype
        from .train import check_device as can_train_here
        resolve_compute_dtype(cfg)
        can_train_here(cfg)
    except UserError as err:
        out.append((FAIL, str(err)))
    return out


def _bnb_round_trip(device: str, dtype, keep_layout: bool) -> tuple[float, float, bool]:
    """What a run does to one NF4 layer: an eval-mode forward without grad (eval, chat, the demo's first look), then
    a training forward and backward. -> (output error, input-gradient error, repacked), relative to the weight
    dequantized before anything ran."""
    import bitsandbytes as bnb
    import torch
    from .model import keep_trainable_layout
    g = torch.Generator().manual_seed(0)
    lin = bnb.nn.Linear4bit(256, 128, bias=False, compute_dtype=dtype, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(torch.randn(128, 256, generator=g), requires_grad=False, quant_type="nf4",
                                   compress_statistics=True)
    lin = lin.to(device)
    if keep_layout:
        keep_trainable_layout(lin)
    deq = bnb.functional.dequantize_4bit(lin.weight.data, lin.weight.quant_state).float()
    x = torch.randn(8, 256, generator=g).to(device, dtype)
    lin.eval()
    with torch.no_grad():
        lin(x)
    repacked = bool(getattr(lin.weight.quant_state, "packing_format_for_cpu", False))
    lin.train()
    x = x.clone().requires_grad_(True)
    y = lin(x)
    dy = torch.randn(y.shape, generator=g).to(device, dtype)
    with warnings.catch_warnings():  # the repacked kernel has no autograd, and torch says so: the check reports it
        warnings.simplefilter("ignore")
        y.backward(dy)
    rel = lambda a, b: float("inf") if a is None else float((a.float() - b).norm() / b.norm())  # noqa: E731
    return rel(y.detach(), x.detach().float() @ deq.t()), rel(x.grad, dy.float() @ deq), repacked


def check_bnb_matmul() -> list[tuple[str, str]]:
    """Quantize a weight to NF4 on the device and run it as a run does (eval forward, then forward + backward),
    once as falcon-qlora loads 4-bit layers and once as bitsandbytes sets them up on its own."""
    try:
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        err, grad_err, _ = _bnb_round_trip(device, dtype, keep_layout=True)
        _, stock_grad_err, repacked = _bnb_round_trip(device, dtype, keep_layout=False)
    except Exception as exc:  # any failure here is the answer
        return [(FAIL, f"bitsandbytes 4-bit matmul failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")]
    tol = 2e-2 if dtype != torch.float32 else 1e-4
    if not (err < tol and grad_err < tol):
        return [(FAIL, f"bitsandbytes 4-bit matmul on {device} is wrong (relative error {err:.2g} forward, "
                       f"{grad_err:.2g} backward after an eval-mode forward)")]
    out = [(OK, f"bitsandbytes NF4 matmul on {device} ({str(dtype)[6:]}): relative error {err:.1e} forward, "
                f"{grad_err:.1e} backward after an eval-mode forward")]
    if repacked and not stock_grad_err < tol:
        wrong = "no gradient reaches the input" if stock_grad_err == float("inf") else \
            f"relative error {stock_grad_err:.2g}"
        out.append((INFO, "this CPU has AVX512-BF16: bitsandbytes on its own repacks a 4-bit weight after an "
                          f"eval-mode forward, and the backward after it is wrong ({wrong});"
                          " falcon-qlora turns that repacking off on every model it loads, and train and merge stop "
                          "on a repacked layer"))
    return out


def check_memory_and_disk(cfg: RunConfig) -> list[tuple[str, str]]:
    import torch
    from .estimate import estimate
    from .plan import make_plan
    try:
        plan = make_plan(cfg)  # what `train` would run here
        est = estimate(cfg, plan=plan)
    except UserError as err:
        return [(WARN, f"no memory/disk estimate: {err}")]
    out, gib = [(INFO, f"plan: {plan.describe()}")], 2 ** 30
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(0)
        need = est["peak_bytes"]
        status = FAIL if need > total else WARN if need > free else OK
        out.append((status, f"GPU memory: the run needs ~{need / gib:.1f} GiB at its peak (falcon-qlora estimate), "
                    f"GPU 0 has {total / gib:.1f} GiB ({free / gib:.1f} free)"
                    + ("; try profile=memory, or lower per_device_train_batch_size" if status != OK else "")))
    host = est.get("host_bytes") or 0
    if host:  # the memory profile's offloaded layer inputs live in pinned host RAM
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        status = OK if host < 0.8 * avail else WARN
        out.append((status, f"host memory: profile {est['profile']} keeps ~{host / gib:.1f} GiB of layer inputs in "
                    f"pinned host RAM, {avail / gib:.1f} GiB available"
                    + ("; close other programs or use profile=reference" if status != OK else "")))
    target = Path(cfg.output_dir).resolve()
    while not target.exists():
        target = target.parent
    free = shutil.disk_usage(target).free
    need = est["disk_peak_bytes"]
    msg = (f"disk: {free / gib:.1f} GiB free at {target}, the run's checkpoints need up to {need / gib:.2f} GiB "
           f"({est['checkpoints_kept']} kept of {est['checkpoints_written']}, "
           f"{est['checkpoint_bytes'] / gib:.2f} GiB each)")
    out.append((OK, msg) if free > need else (FAIL, msg + ": free space, or lower save_total_limit"))
    return out


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> tuple[bool, str]:
    import urllib.error
    import urllib.request
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return False, "offline mode (HF_HUB_OFFLINE=1)"
    url = constants.ENDPOINT.rstrip("/") + "/api/models?limit=1"  # a hub answers with a JSON list
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            json.loads(resp.read(1 << 16))
        return True, f"{constants.ENDPOINT} reachable"
    except urllib.error.HTTPError as err:  # something answered, but not a working hub (a proxy, a captive portal)
        return False, f"{constants.ENDPOINT} answered HTTP {err.code}: not a working hub"
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        return False, f"{constants.ENDPOINT} unreachable within {timeout:.0f} s ({reason})"


def check_hub(cfg: RunConfig) -> list[tuple[str, str]]:
    from huggingface_hub import try_to_load_from_cache
    from .data import DATASET_ALIASES
    from .model import is_local_model
    up, msg = hub_reachable()
    if up:
        return [(OK, f"hub: {msg}")]
    out = [(INFO, f"hub: {msg}")]
    name = cfg.model_name_or_path
    if not is_local_model(name) and not isinstance(try_to_load_from_cache(name, "config.json"), str):
        out.append((FAIL, f"model {name} is neither a local folder nor in the hub cache, and the hub is not "
                          "reachable: download it where there is network, or point model_name_or_path at a folder"))
    from .config import dataset_names
    for ds in dataset_names(cfg):
        if ds not in DATASET_ALIASES and not os.path.exists(ds):
            out.append((WARN, f"dataset {ds} must come from the datasets cache (the hub is not reachable)"))
    if cfg.push_to_hub:
        out.append((FAIL, f"push_to_hub={cfg.push_to_hub} needs the hub: unset it, or publish later"))
    return out


def _model_type(cfg: RunConfig) -> str | None:
    from .memory import model_config
    try:
        return model_config(cfg.model_name_or_path).model_type
    except (UserError, OSError, ValueError):
        return "falcon" if "falcon" in cfg.model_name_or_path.lower() else None


def run_checks(cfg: RunConfig) -> list[tuple[str, str]]:
    results = check_device(cfg) + check_bnb_matmul() + check_versions(cfg, _model_type(cfg))
    return results + check_memory_and_disk(cfg) + check_hub(cfg)


def report(cfg: RunConfig, results: list[tuple[str, str]]) -> str:
    lines = [f"falcon-qlora doctor: {cfg.model_name_or_path} on {cfg.dataset_name} "
             "(paste this block into bug reports)"]
    lines += [f"  {status:<5} {msg}" for status, msg in results]
    fails = sum(s == FAIL for s, _ in results)
    lines.append(f"{fails} problem{'s' if fails != 1 else ''}: a run of this config would fail" if fails
                 else "no problems found: this config can run here")
    return "\n".join(lines)


def cli(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print("usage: falcon-qlora doctor [--config PRESET_OR_YAML] [--key value ...]\n\n" + __doc__.split("\n\n")[2])
        return 0
    from .config import parse_args
    cfg = parse_args(list(argv))
    results = run_checks(cfg)
    print(report(cfg, results))
    return 1 if any(s == FAIL for s, _ in results) else 0
