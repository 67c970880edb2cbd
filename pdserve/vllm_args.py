"""vLLM's own engine arguments, by vLLM's names, from vLLM's own parser; and config files.

`pdserve serve|prefill|decode|mixed` take every argument of `vllm serve`'s engine
(`AsyncEngineArgs.add_cli_args`) beside their own: a flag pdserve does not define goes to
vLLM's parser, which checks and types it exactly as `vllm serve` would. Only what the user
gave reaches the engine (`parse`), on top of pdserve's engine settings, so a vLLM release
that adds an argument adds it here too, with nothing to keep in step.

A few are pdserve's to set, because pdserve builds them (the KV connector and its event
stream) or names them its own way (`--kv-cache-gib`); those are refused with a pointer.
Pipeline parallelism is refused (tensor parallelism is not: each rank runs its own KV
agent, kv_transfer/connector/ranks.py).

`--config FILE` (YAML) holds the same keys as the flags (dashes or underscores), and for
`serve` a `prefill:` and a `decode:` section whose keys apply to that pool only. Flags on
the command line win over the file. `pdserve scheduler` and `pdserve frontend` read the
same file: each command skips the keys another command takes (`with_config`).
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path
from typing import Any

# vLLM arguments pdserve sets itself: the reason, shown to the user
OWNED = {
    "kv_transfer_config": "pdserve attaches its own KV connector",
    "kv_events_config": "pdserve subscribes to the engine's KV events itself",
    "kv_cache_memory_bytes": "use --kv-cache-gib",
    "pipeline_parallel_size": "pipeline parallelism is not supported yet",
    "data_parallel_size": "run more workers instead (--prefill-workers, --decode-workers)",
}


@functools.lru_cache(maxsize=1)
def parser() -> argparse.ArgumentParser:
    """vLLM's engine-argument parser, every default suppressed: it yields only what the
    user gave."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    p = FlexibleArgumentParser(prog="pdserve", add_help=False,
                               usage="pdserve COMMAND [pdserve flags] [vLLM engine arguments]")
    AsyncEngineArgs.add_cli_args(p)
    for a in p._actions:
        a.default = argparse.SUPPRESS
    return p


def parse(argv: list[str]) -> dict[str, Any]:
    """vLLM engine arguments given in `argv` -> {AsyncEngineArgs field: value}. An unknown
    flag, a bad value or an argument pdserve owns exits with status 2 and a message, as
    argparse does."""
    if not argv:
        return {}
    p = parser()
    given = vars(p.parse_args(argv))
    for k in given:
        if k in OWNED:
            p.error(f"--{k.replace('_', '-')} cannot be set here: {OWNED[k]}")
    return given


def config_flags(path: str, section: str | None = None) -> list[list[str]]:
    """The flags a YAML config file stands for, one [flag, values...] per key: its
    top-level keys, or one section's. `false` is `--no-FLAG`, as argparse's
    BooleanOptionalAction (pdserve's own switches) and vLLM's boolean arguments take it."""
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise SystemExit(f"pdserve: error: {path}: a config file is a mapping of flags")
    if section is not None:
        data = data.get(section) or {}
        if not isinstance(data, dict):
            raise SystemExit(f"pdserve: error: {path}: `{section}:` must be a mapping")
    out: list[list[str]] = []
    for key, value in data.items():
        if key in ("prefill", "decode") and section is None:
            continue
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            out.append([flag])
        elif value is False:
            out.append(["--no-" + flag[2:]])
        elif value is None:
            continue
        elif isinstance(value, (dict, list)):
            out.append([flag, json.dumps(value)])
        else:
            out.append([flag, str(value)])
    return out


def config_argv(path: str, section: str | None = None) -> list[str]:
    return [tok for group in config_flags(path, section) for tok in group]


def with_config(argv: list[str], flags: dict[str, set[str]] | None = None,
                engine_cmds: tuple[str, ...] = ()) -> list[str]:
    """`argv` (a command and its flags) with `--config FILE`'s flags put first, so the
    command line wins: the file's top-level keys, and for `prefill` and `decode` their
    section. `serve` keeps `--config` and hands each pool its section.

    One file can serve every command (`flags`: each command's own option strings): a key
    another command takes is skipped here (`expose_routing` for a decode worker); so is any
    key this command does not know unless it runs an engine, where vLLM's parser checks it
    (a typo is an error there)."""
    if "--config" not in argv:
        return argv
    i = argv.index("--config")
    if i + 1 >= len(argv):
        raise SystemExit("pdserve: error: --config needs a file")
    path, cmd = argv[i + 1], argv[0] if argv else ""
    groups = config_flags(path)
    if cmd in ("prefill", "decode"):
        groups += config_flags(path, cmd)
    if flags and cmd in flags:
        others = set().union(*(v for k, v in flags.items() if k != cmd))
        groups = [g for g in groups if g[0] in flags[cmd] or
                  (cmd in engine_cmds and g[0] not in others)]
    return [*argv[:1], *(tok for g in groups for tok in g), *argv[1:]]
