"""The settings of ``numformer train``: read a --config file and layer it with the flags.

defaults < the resumed run's saved settings < the --config file (JSON or TOML) <
the flags; the typed checks themselves are :mod:`numformer.train`'s.
"""

from __future__ import annotations

import dataclasses
import json
import os

from numformer import checkpoint
from numformer.cli_errors import UserError


def load_config_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"config file {path!r} does not exist")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        if path.endswith(".toml"):
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib
            settings = tomllib.loads(raw.decode("utf-8"))
        else:
            settings = json.loads(raw)
    except Exception as exc:
        raise UserError(f"config file {path!r} could not be parsed: {exc}") from None
    if not isinstance(settings, dict):
        raise UserError(f"config file {path!r} must hold a table of settings (name: value), "
                        f"not a {type(settings).__name__}")
    return settings


def train_config(args):
    """defaults < saved run (resume) < config file < explicit flags; returns a validated TrainConfig.

    An error about a setting names where its value came from (the flag, the
    config file, or the checkpoint's saved settings)."""
    from numformer.train import resume_settings
    from numformer.train_settings import SettingError, TrainConfig, check_settings

    settings: dict = {}
    origin: dict = {}                                   # setting -> file its value came from (None: a flag)
    if args.resume and args.out is not None:
        raise UserError("--out cannot be combined with --resume (the run continues in its own folder)")
    if args.extend_schedule and not args.resume:
        raise UserError("--extend-schedule only applies with --resume")
    if args.extend_schedule and args.schedule_steps is not None:
        raise UserError("--extend-schedule stretches the schedule to --max-steps; leave --schedule-steps out")
    if args.resume:
        run_dir, saved = resume_settings(args.resume)
        state_file = os.path.join(run_dir, checkpoint.CHECKPOINT_DIR, checkpoint.STATE_FILE)
        check_settings({k: v for k, v in saved.items() if k != "out"}, state_file)
        settings.update(saved)
        origin.update(dict.fromkeys(saved, state_file))
        if args.extend_schedule:
            settings.pop("schedule_steps", None)
    explicit: dict = {}
    if args.config:
        from_file = load_config_file(args.config)
        check_settings(from_file, args.config)
        if args.resume and "out" in from_file and os.path.abspath(from_file["out"]) != settings["out"]:
            raise UserError(f"{args.config}: 'out' cannot be combined with --resume (the run continues in "
                            f"its own folder, {settings['out']})")
        explicit.update(from_file)
        origin.update(dict.fromkeys(from_file, args.config))
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name)
        if value is not None:
            explicit[f.name] = value
            origin[f.name] = None
    settings.update(explicit)
    if settings.get("task"):
        _check_task_settings(settings["task"], explicit, origin)
    elif explicit.get("vocab_size") is not None and settings.get("tokenizer", "char") == "char" \
            and not args.resume:
        where = "--vocab-size" if origin.get("vocab_size") is None else f"'vocab_size' in {origin['vocab_size']}"
        raise UserError(f"{where} applies to --tokenizer bpe only (a char tokenizer has one id per character "
                        "of the data); add --tokenizer bpe or leave it out")
    if settings.get("task") and not args.resume:        # a task brings its own tuned defaults
        from numformer.tasks import TASKS

        if settings["task"] in TASKS:
            settings = {**TASKS[settings["task"]].recommended_settings(), **settings}
    try:
        return TrainConfig.from_dict(settings, source=args.config or "settings").validate()
    except SettingError as exc:
        if exc.source is None and origin.get(exc.name):
            raise SettingError(exc.name, exc.problem, origin[exc.name]) from None
        raise


def _check_task_settings(task: str, explicit: dict, origin: dict) -> None:
    """A synthetic task brings its own data, tokenizer and context: refuse settings it would ignore."""
    from numformer.tasks import TASKS

    if task not in TASKS:
        return                                         # validate() names the valid tasks
    ignored = [n for n in ("data", "tokenizer", "vocab_size") if explicit.get(n) is not None]
    block = TASKS[task]().block_size
    if explicit.get("block_size") not in (None, block):
        ignored.append("block_size")
    if ignored:
        where = lambda n: f"--{n.replace('_', '-')}" if origin.get(n) is None else f"{n!r} in {origin[n]}"
        raise UserError(f"--task {task} brings its own data, tokenizer and context ({block} tokens); "
                        f"{', '.join(map(where, ignored))} would be ignored: leave them out")
