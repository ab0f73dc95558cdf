"""The run directory: every name falcon-qlora writes under output_dir, known here and nowhere else.

    results/                   (output_dir)
      run_config.yaml          the resolved config; `falcon-qlora train --config results/run_config.yaml` reruns it
      versions.json            the library versions of the run
      base_fingerprint.json    which base weights the adapter is trained on
      checkpoint-N/            adapter + trainer state, complete or absent (checkpoints.py)
      final/                   the finished adapter, its tokenizer and the run files
      metrics.jsonl, loss.png  the trainer's log history and its plot
      demo_loss.png            the demo's figure: loss.png plus the held-out loss before and after
      README.md                the model card TRL writes; runs/, wandb/: the loggers' folders
      .staging-NAME/           a folder being written, renamed to NAME when complete (.trash-NAME: being deleted)

final/ and every checkpoint-N/ hold a copy of the run files (run_config.yaml, base_fingerprint.json), so chat, eval,
merge, export and publish need only that folder; `falcon-qlora eval` writes eval.json into it.

    from falcon_qlora.rundir import RunDir, load_run_config
    RunDir("results").final                      # -> results/final
    save_run_config(cfg, "results")              # run_config.yaml and versions.json, before the model loads
    load_run_config("results/final")             # the config that trained this adapter
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

FINAL, CHECKPOINT, HUB = "final", "checkpoint-", "hub-"
RUN_CONFIG, VERSIONS, FINGERPRINT = "run_config.yaml", "versions.json", "base_fingerprint.json"
METRICS, LOSS_PLOT, DEMO_PLOT = "metrics.jsonl", "loss.png", "demo_loss.png"
CARD, EVAL = "README.md", "eval.json"
LOGGER_DIRS = ("runs", "wandb")  # TensorBoard's and W&B's folders (W&B writes under output_dir, see train.wandb_env)
STAGING, TRASH = ".staging-", ".trash-"  # hidden prefixes: never matched by `checkpoint-*`
RUN_FILES = (RUN_CONFIG, FINGERPRINT)  # copied from the run dir into every checkpoint and final/


@dataclass(frozen=True)
class RunDir:
    """The paths of one run (or of a folder that holds the run files: final/, checkpoint-N/, a merged model)."""
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    final = property(lambda self: self.root / FINAL)
    run_config = property(lambda self: self.root / RUN_CONFIG)
    versions = property(lambda self: self.root / VERSIONS)
    fingerprint = property(lambda self: self.root / FINGERPRINT)
    metrics = property(lambda self: self.root / METRICS)
    loss_plot = property(lambda self: self.root / LOSS_PLOT)
    demo_plot = property(lambda self: self.root / DEMO_PLOT)
    card = property(lambda self: self.root / CARD)
    eval = property(lambda self: self.root / EVAL)

    def checkpoint(self, step: int) -> Path:
        return self.root / f"{CHECKPOINT}{step}"

    def hub_folder(self, repo_id: str) -> Path:
        """Where publish builds the folder it uploads (kept, so a failed upload can be retried by hand)."""
        return self.root / f"{HUB}{repo_id.replace('/', '--')}"

    def written_names(self) -> list[str]:
        """Every name written directly in the run dir, the checkpoint-N and hub-* folders on disk included."""
        names = [FINAL, RUN_CONFIG, VERSIONS, FINGERPRINT, METRICS, LOSS_PLOT, DEMO_PLOT, CARD, *LOGGER_DIRS]
        if self.root.is_dir():
            names += sorted(p.name for p in self.root.iterdir() if p.name.startswith((CHECKPOINT, HUB)))
        return names


def staging_of(path: Path) -> Path:
    """The hidden folder `path` is written into before it is renamed into place."""
    return Path(path).with_name(f"{STAGING}{Path(path).name}")


def trash_of(path: Path) -> Path:
    """The hidden name `path` is renamed to before it is deleted."""
    return Path(path).with_name(f"{TRASH}{Path(path).name}")


def step_of(path: Path) -> int | None:
    """N for a checkpoint-N folder, else None."""
    tail = Path(path).name.removeprefix(CHECKPOINT)
    return int(tail) if Path(path).name.startswith(CHECKPOINT) and tail.isdigit() else None


def run_of(folder: Path) -> Path | None:
    """The run dir a final/ or checkpoint-N/ folder belongs to, else None."""
    folder = Path(folder)
    return folder.parent if folder.name == FINAL or step_of(folder) is not None else None


def copy_run_files(run_dir: Path, folder: Path) -> None:
    """Copy the run files into a checkpoint or final/ folder being written, so that it describes itself."""
    import shutil
    for name in RUN_FILES:
        if (Path(run_dir) / name).is_file():
            shutil.copy2(Path(run_dir) / name, Path(folder) / name)


def save_run_config(cfg, run_dir: str | Path) -> Path:
    """Write the resolved config (reloadable with --config) and the library versions into the run dir."""
    import json
    import yaml
    from .config import library_versions, to_dict
    run = RunDir(run_dir)
    run.root.mkdir(parents=True, exist_ok=True)
    header = f"# Resolved falcon-qlora config. Rerun with: falcon-qlora train --config {run.run_config}\n"
    run.run_config.write_text(header + yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    run.versions.write_text(json.dumps(library_versions(), indent=2) + "\n", encoding="utf-8")
    return run.run_config


def has_run_config(folder: Path) -> bool:
    return RunDir(folder).run_config.is_file()


def load_run_config(folder: str | Path, **overrides):
    """The run config saved in `folder` (final/, checkpoint-N/, a run dir or a merged model) with `overrides`
    applied; the defaults plus overrides when it has none (a bare peft adapter). A saved config that does not load
    is one ConfigError naming the file."""
    from .config import ConfigError, load_config, read_yaml
    path = RunDir(folder).run_config
    if not path.is_file():
        return load_config(None, **overrides)
    try:
        return load_config(None, **{**read_yaml(path), **overrides})
    except ConfigError as err:
        why = str(err).replace(str(path), "it")
        raise ConfigError(f"{path} (the run config saved with this folder) does not load: {why}") from None
