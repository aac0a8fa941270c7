"""options.py: option groups validate where defined; the 0.1 flat keywords still work, warned."""

from __future__ import annotations

import os
import threading
import warnings

import pytest
import torch

from asyncckpt import (
    AsyncCheckpointer,
    ConfigError,
    ScheduleOptions,
    SelectOptions,
    SnapshotOptions,
    StagingOptions,
    StorageOptions,
    WriterOptions,
    list_checkpoints,
)
from asyncckpt.legacy import from_legacy
from asyncckpt.options import as_retention
from asyncckpt.policy import (
    EveryNSteps,
    KeepAll,
    KeepLast,
    Never,
    axolotl,
    h2o_llm_studio,
    hf_trainer,
    internlm,
    openpi,
)

BAD = [
    (ScheduleOptions, {"policy": "every 5"}, "policy"),
    (ScheduleOptions, {"policy": 2.5}, "policy"),
    (ScheduleOptions, {"policy": 0}, "n"),  # EveryNSteps(0)
    (ScheduleOptions, {"total_steps": -1}, "total_steps"),
    (ScheduleOptions, {"total_steps": True}, "total_steps"),
    (ScheduleOptions, {"total_steps": 10.0}, "total_steps"),
    (ScheduleOptions, {"final": "yes"}, "final"),
    (ScheduleOptions, {"on_signal": "SIGTERM"}, "on_signal"),
    (ScheduleOptions, {"on_signal": [15.0]}, "on_signal"),
    (ScheduleOptions, {"trigger_file": 5}, "trigger_file"),
    (SnapshotOptions, {"every": 0}, "every"),
    (SnapshotOptions, {"every": True}, "every"),
    (SnapshotOptions, {"every": "5"}, "every"),
    (SnapshotOptions, {"every": 5, "slots": 0}, "slots"),
    (SelectOptions, {"include": "model"}, "include"),
    (SelectOptions, {"include": [1]}, "include"),
    (SelectOptions, {"exclude": "optim"}, "exclude"),
    (SelectOptions, {"exclude": [None]}, "exclude"),
    (SelectOptions, {"dtype": torch.int8}, "dtype"),
    (SelectOptions, {"dtype": "bfloat16"}, "dtype"),
    (StagingOptions, {"max_inflight": 0}, "max_inflight"),
    (StagingOptions, {"max_inflight": 1.0}, "max_inflight"),
    (StagingOptions, {"max_inflight": True}, "max_inflight"),
    (StagingOptions, {"on_busy": "drop"}, "on_busy"),
    (StagingOptions, {"overlap": 1}, "overlap"),
    (WriterOptions, {"executor": "fork"}, "executor"),
    (WriterOptions, {"threads": 0}, "threads"),
    (WriterOptions, {"commit_timeout": 0}, "commit_timeout"),
    (WriterOptions, {"commit_timeout": -1.0}, "commit_timeout"),
    (WriterOptions, {"commit_timeout": float("nan")}, "commit_timeout"),
    (WriterOptions, {"commit_timeout": "600"}, "commit_timeout"),
    (WriterOptions, {"commit_timeout": True}, "commit_timeout"),
    (StorageOptions, {"fsspec": "anon=True"}, "fsspec"),
    (StorageOptions, {"local_dir": 5}, "local_dir"),
]


@pytest.mark.parametrize("cls, kwargs, field", BAD, ids=[f"{c.__name__}-{k}" for c, k, _ in BAD])
def test_option_groups_reject_bad_values_naming_the_field(cls, kwargs, field):
    with pytest.raises(ConfigError, match=field):
        cls(**kwargs)


UNCHECKED = [
    (ScheduleOptions, {"on_signal": 15}, "on_signal"),  # one signal, not a list: bare TypeError
    (ScheduleOptions, {"on_signal": None}, "on_signal"),
    (SelectOptions, {"exclude": None}, "exclude"),
    (SelectOptions, {"include": 5}, "include"),
    (SelectOptions, {"model_only": "no"}, "model_only"),  # accepted, and truthy
    (WriterOptions, {"restart": "no"}, "restart"),  # accepted, and truthy
]


@pytest.mark.parametrize("cls, kwargs, field", UNCHECKED, ids=[f"{c.__name__}-{k}" for c, k, _ in UNCHECKED])
def test_option_groups_reject_these_bad_values_too(cls, kwargs, field):
    with pytest.raises(ConfigError, match=field):
        cls(**kwargs)


def test_option_groups_accept_good_values_and_normalize():
    s = ScheduleOptions(policy=5, total_steps=0, on_signal=[15], trigger_file="/tmp/x")
    assert s.policy == EveryNSteps(5) and s.on_signal == (15,)
    assert ScheduleOptions(policy=Never()).policy == Never()
    assert ScheduleOptions().policy is None
    sel = SelectOptions(include=["model"], exclude=["optim"], dtype=torch.bfloat16)
    assert sel.include == ("model",) and sel.exclude == ("optim",)
    assert StagingOptions(max_inflight=3, on_busy="skip", overlap=True).max_inflight == 3
    assert WriterOptions(executor="process", threads=4, commit_timeout=1).commit_timeout == 1
    assert SnapshotOptions(every=5).slots == 2
    assert StorageOptions(fsspec={"anon": True}, local_dir="/nvme").local_dir == "/nvme"
    # frozen
    with pytest.raises(AttributeError):
        s.total_steps = 3  # type: ignore[misc]


def test_select_patterns_model_only():
    state = {"model": torch.nn.Linear(2, 2), "extra": torch.zeros(1)}
    assert SelectOptions(model_only=True).patterns(state) == (["model"], [])
    assert SelectOptions(include=["extra"], model_only=True).patterns(state) == (["extra", "model"], [])
    with pytest.raises(ConfigError, match="no nn.Module"):
        SelectOptions(model_only=True).patterns({"x": torch.zeros(1)})


def test_as_retention():
    assert as_retention(None) == []
    assert as_retention(3) == [KeepLast(3)]
    assert as_retention(KeepAll()) == [KeepAll()]
    assert as_retention([KeepLast(1), KeepAll()]) == [KeepLast(1), KeepAll()]
    for bad in ("3", [3], True, object()):
        with pytest.raises(ConfigError, match="keep"):
            as_retention(bad)


# --------------------------------------------------------------------------- the 0.1 keywords


def _state() -> dict:
    torch.manual_seed(0)
    return {"model": torch.nn.Linear(3, 2), "extra": {"epoch": 0}}


def _run(ckpt: AsyncCheckpointer, steps: int = 7) -> list[int]:
    with ckpt:
        for step in range(1, steps + 1):
            ckpt.save_async(step)
    return [c.step for c in list_checkpoints(ckpt.root)]


def _ours(caught) -> list[warnings.WarningMessage]:
    return [
        w for w in caught if issubclass(w.category, DeprecationWarning) and "flat keywords" in str(w.message)
    ]


def test_flat_keywords_warn_once_and_behave_the_same(tmp_path):
    with pytest.warns(DeprecationWarning) as caught:
        old = AsyncCheckpointer(tmp_path / "old", _state(), max_inflight=2, save_policy=3, executor="thread")
    (w,) = _ours(caught)
    msg = str(w.message)
    for hint in (
        "max_inflight= -> staging=StagingOptions(max_inflight=...)",
        "save_policy= -> schedule=ScheduleOptions(policy=...)",
        "executor= -> writer=WriterOptions(executor=...)",
    ):
        assert hint in msg
    assert w.filename == __file__  # points at the caller, not into the library
    new = AsyncCheckpointer(
        tmp_path / "new",
        _state(),
        staging=StagingOptions(max_inflight=2),
        schedule=ScheduleOptions(policy=3),
        writer=WriterOptions(executor="thread"),
    )
    assert old.options == new.options
    assert _run(old) == _run(new) == [3, 6, 7]  # 7: the final step the policy skipped


def test_the_warning_is_seen_with_catch_warnings_too(tmp_path):
    """pyproject's filterwarnings ignores it for the other suites; "always" brings it back."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = AsyncCheckpointer(tmp_path, _state(), write_threads=1, mode="final_only", save_final=False)
    assert len(_ours(caught)) == 1
    assert "mode='final_only' -> schedule=ScheduleOptions(policy=Never())" in str(_ours(caught)[0].message)
    assert ckpt.options.schedule == ScheduleOptions(policy=Never(), final=False)
    ckpt.close()


def test_mode_disabled_and_the_legacy_storage_backend(tmp_path):
    from asyncckpt.storage import LocalStorage

    backend = LocalStorage()
    with pytest.warns(DeprecationWarning, match="storage=<backend> -> storage=StorageOptions"):
        ckpt = AsyncCheckpointer(tmp_path / "a", _state(), storage=backend)
    assert ckpt.options.storage.backend is backend
    ckpt.close()
    with pytest.warns(DeprecationWarning, match="enabled=False"):
        off = AsyncCheckpointer(tmp_path / "b", _state(), mode="disabled")
    assert off.save_async(1) is None
    off.close()
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "legacy, group",
    [
        ({"max_inflight": 2}, {"staging": StagingOptions()}),
        ({"save_policy": 3}, {"schedule": ScheduleOptions()}),
        ({"snapshot_every": 5}, {"snapshots": SnapshotOptions(every=2)}),
        ({"exclude": ["optim"]}, {"select": SelectOptions()}),
        ({"commit_timeout": 5}, {"writer": WriterOptions()}),
        ({"local_dir": "/x"}, {"storage": StorageOptions()}),
        ({"mode": "final_only"}, {"schedule": ScheduleOptions()}),
    ],
)
def test_a_keyword_given_both_ways_is_a_config_error(tmp_path, legacy, group):
    with pytest.raises(ConfigError, match="given both"):
        AsyncCheckpointer(tmp_path, _state(), **group, **legacy)
    assert not tmp_path.joinpath("step_000000001").exists()


def test_unknown_keyword_is_a_type_error(tmp_path):
    with pytest.raises(TypeError, match="save_polcy"):
        AsyncCheckpointer(tmp_path, _state(), save_polcy=3)
    assert os.listdir(tmp_path) == []


def test_bad_legacy_values_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="max_inflight"):
        AsyncCheckpointer(tmp_path, _state(), max_inflight=0)
    with pytest.raises(ConfigError, match="mode"):
        AsyncCheckpointer(tmp_path, _state(), mode="sometimes")


def test_from_legacy_without_legacy_keywords_is_silent():
    groups = {"schedule": None, "staging": StagingOptions()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, enabled = from_legacy(dict(groups), {})
    assert out == groups and enabled


def test_from_legacy_snapshot_keywords():
    with pytest.warns(DeprecationWarning):
        out, _ = from_legacy({}, {"snapshot_every": 4, "snapshot_slots": 3})
    assert out["snapshots"] == SnapshotOptions(every=4, slots=3)
    with pytest.warns(DeprecationWarning):
        out, _ = from_legacy({}, {"snapshot_every": None, "snapshot_slots": 3})
    assert out.get("snapshots") is None  # no snapshot_every: no snapshots


def test_from_legacy_final_only_wins_over_save_policy_in_any_order():
    for legacy in ({"save_policy": 5, "mode": "final_only"}, {"mode": "final_only", "save_policy": 5}):
        with pytest.warns(DeprecationWarning):
            out, _ = from_legacy({}, legacy)
        assert out["schedule"].policy == Never(), legacy


# --------------------------------------------------------------------------- presets


PRESETS = {
    "hf_trainer": lambda: hf_trainer(
        save_steps=2, save_total_limit=2, metric_for_best_model="loss", total_steps=7
    ),
    "hf_trainer_all": lambda: hf_trainer(save_steps=3),
    "axolotl": lambda: axolotl(steps_per_epoch=4, saves_per_epoch=2, save_total_limit=1),
    "openpi": lambda: openpi(save_interval=2, keep_period=4, total_steps=7),
    "internlm": lambda: internlm(checkpoint_every=3, snapshot_every=2, total_steps=7),
    "h2o_last": lambda: h2o_llm_studio("last", total_steps=7),
    "h2o_best": lambda: h2o_llm_studio("best"),
    "h2o_disabled": lambda: h2o_llm_studio("disabled"),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_option_groups_usable_without_a_warning(tmp_path, name):
    preset = PRESETS[name]()
    assert set(preset) == {"schedule", "keep", "snapshots", "enabled"}
    assert isinstance(preset["schedule"], ScheduleOptions)
    assert preset["snapshots"] is None or isinstance(preset["snapshots"], SnapshotOptions)
    assert isinstance(preset["enabled"], bool)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = AsyncCheckpointer(tmp_path / "ckpt", _state(), **preset)
        with ckpt:
            for step in range(1, 8):
                ckpt.save_async(step, metrics={"loss": 1.0 / step})
    assert [w for w in caught if issubclass(w.category, DeprecationWarning)] == []
    saved = list_checkpoints(tmp_path / "ckpt")
    if preset["enabled"]:
        assert saved, "the preset saved nothing"
        assert saved[-1].step == 7 or not preset["schedule"].final
    else:
        assert saved == [] and not (tmp_path / "ckpt").exists()


def test_internlm_preset_keeps_snapshots_in_two_slots(tmp_path):
    ckpt = AsyncCheckpointer(
        tmp_path, _state(), **internlm(checkpoint_every=3, snapshot_every=2, total_steps=9)
    )
    with ckpt:
        for step in range(1, 10):
            ckpt.save_async(step)
    got = {(c.tier, c.step) for c in list_checkpoints(tmp_path)}
    assert {s for t, s in got if t == "permanent"} == {3, 6, 9}
    assert {s for t, s in got if t == "snapshot"} == {4, 8}


# --------------------------------------------------------------------------- disabled


def test_enabled_false_creates_no_files_and_no_threads(tmp_path):
    root = tmp_path / "ckpt"
    before = threading.active_count()
    names_before = {t.name for t in threading.enumerate()}
    ckpt = AsyncCheckpointer(
        root, _state(), schedule=1, keep=1, snapshots=SnapshotOptions(every=1), enabled=False
    )
    assert threading.active_count() == before
    assert ckpt.save_async(1) is None
    assert ckpt.save_async(2, force=True) is None
    assert not ckpt.should_save(3)
    ckpt.protect(1)
    ckpt.wait_staged()
    ckpt.wait()
    assert ckpt.resume() is None
    assert ckpt.stats() == []
    ckpt.close(final_step=5)
    assert threading.active_count() == before
    assert {t.name for t in threading.enumerate()} == names_before
    assert not root.exists()
    assert os.listdir(tmp_path) == []


def test_enabled_false_still_checks_the_state(tmp_path):
    with pytest.raises(TypeError, match="cannot checkpoint"):
        AsyncCheckpointer(tmp_path, {"bad": object()}, enabled=False)
