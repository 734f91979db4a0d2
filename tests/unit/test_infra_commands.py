"""Every `convllava` command line in infra/ (manifests, comments, the Dockerfile, infra/README.md) is one
the real CLI parser accepts and names config files that exist; prose names real subcommands."""

from __future__ import annotations

import argparse
import re

import pytest
from infra_harness import COMMAND_IDS, COMMANDS, INFRA, ROOT, parse_command

from jobs.cli import build_parser

_PROSE_MENTION = re.compile(r"`convllava\s+([^`]+)`")


def _subcommands() -> set[str]:
    (action,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return set(action.choices)


def test_the_commands_that_matter_were_found():
    """Guards the extraction itself: the entry points of every way to run the pipeline are among COMMANDS."""
    found = {
        (src.split("[")[0].split(" ")[0], " ".join(a for a in argv[1:3] if not a.startswith("-")))
        for src, argv in COMMANDS
    }
    assert {
        ("infra/kuberay/rayjob.yaml", "pipeline run"),
        ("infra/kuberay/raycronjob.yaml", "retrain"),
        ("infra/kuberay/cronjob-rayjob.yaml", "retrain"),
        ("infra/kuberay/raycluster.yaml", "submit"),
        ("infra/ray-cluster-launcher/aws.yaml", "submit"),
        ("infra/docker/Dockerfile", "info"),
        ("infra/README.md", "pipeline run"),
    } <= found


@pytest.mark.parametrize("source, argv", COMMANDS, ids=COMMAND_IDS)
def test_command_is_accepted_by_the_cli(source, argv):
    assert argv[0] == "convllava"
    parse_command(argv[1:], source)


@pytest.mark.parametrize("source, argv", COMMANDS, ids=COMMAND_IDS)
def test_config_files_named_by_commands_exist(source, argv):
    """Paths are relative to the repository root: the image's working directory is a copy of it."""
    for ns in parse_command(argv[1:], source):
        config = getattr(ns, "config", None)
        if config is not None:
            assert (ROOT / config).is_file(), f"{source}: `--config {config}` is not a file in the repository"


def test_prose_mentions_name_real_subcommands():
    subcommands = _subcommands()
    for path in sorted(p for p in INFRA.rglob("*") if p.is_file()):
        for mention in _PROSE_MENTION.findall(path.read_text()):
            assert mention.split()[0] in subcommands, f"{path.relative_to(ROOT)}: `convllava {mention}`"
