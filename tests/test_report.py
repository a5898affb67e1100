"""``recipe report RUN_DIR``: a PNG and an HTML page from a run's TensorBoard events, a note for
each tag the run did not log, and a one-line error for a folder that holds no run."""

import pytest
from lightning.pytorch.loggers import TensorBoardLogger

from recipe.cli import main
from recipe.report import make_report, read_scalars
from test_cli_usability import tiny_fit

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return tiny_fit(tmp_path_factory)


def log(folder, values: dict[int, dict[str, float]], version: int | None = None) -> None:
    """Write ``{step: {tag: value}}`` as one TensorBoard run (``lightning_logs/version_<n>``) under ``folder``."""
    logger = TensorBoardLogger(str(folder), version=version)
    for step, metrics in values.items():
        logger.log_metrics(metrics, step=step)
    logger.finalize("success")


def test_report_of_a_real_run(tiny_run, tmp_path):
    root, _, _ = tiny_run
    scalars = read_scalars(root)
    assert sorted(scalars["train/loss"]) == [0, 1, 2, 3]
    assert len(scalars["val/loss"]) == 2  # after steps 2 and 4

    report = make_report(root, tmp_path / "out")
    assert report.png.read_bytes().startswith(PNG_MAGIC)
    assert report.panels == ["Loss", "Learning rate and phases", "Batch size and sequence length", "Data mix",
                             "Throughput", "Gradient norm and skipped steps"]
    # The tiny config gives TokenThroughput no peak, so MFU is absent: noted, not fatal.
    assert any("train/mfu was not logged" in note for note in report.notes), report.notes
    page = report.html.read_text()
    assert '<img alt="plots' in page and "data:image/png;base64," in page
    assert "train/mfu was not logged" in page and "train/mix/code" in page


def test_report_command_writes_into_the_run_folder_by_default(tiny_run, tmp_path, capsys):
    import shutil

    root, _, _ = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(root / "lightning_logs", copy / "lightning_logs")
    assert main(["report", str(copy)]) == 0
    assert f"wrote {copy / 'report.png'} and {copy / 'report.html'}" in capsys.readouterr().out
    assert (copy / "report.png").read_bytes().startswith(PNG_MAGIC)


def test_missing_tags_leave_their_panels_out_with_a_note(tmp_path):
    log(tmp_path / "run", {step: {"train/loss": 10.0 - step} for step in range(3)})
    report = make_report(tmp_path / "run")
    assert report.panels == ["Loss"]
    notes = "\n".join(report.notes)
    assert "Learning rate and phases: left out, train/lr was not logged" in notes
    assert "Loss: val/loss was not logged" in notes
    assert "Data mix: left out, train/mix/* was not logged" in notes
    assert report.png.read_bytes().startswith(PNG_MAGIC)


def test_a_resumed_run_is_merged_and_its_replayed_steps_take_the_later_value(tmp_path):
    log(tmp_path / "run", {0: {"train/loss": 5.0}, 1: {"train/loss": 4.0}, 2: {"train/loss": 3.9}}, version=0)
    log(tmp_path / "run", {2: {"train/loss": 3.0}, 3: {"train/loss": 2.0}}, version=1)  # resumed at step 2
    assert read_scalars(tmp_path / "run")["train/loss"] == {0: 5.0, 1: 4.0, 2: 3.0, 3: 2.0}


def test_a_missing_folder_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path / 'nowhere'} does not exist; pass a run's folder (its trainer.default_root_dir, " \
                  "e.g. runs/tiny)"


def test_a_folder_without_event_files_is_one_line(tmp_path, capsys):
    (tmp_path / "lightning_logs" / "version_0").mkdir(parents=True)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds no TensorBoard event files" in err
    assert not (tmp_path / "report.png").exists()


def test_event_files_without_values_are_one_line(tmp_path, capsys):
    from recipe.report import has_scalars

    # What a run stopped before its first step leaves: the hyperparameters, with Lightning's
    # placeholder scalar hp_metric, and no value of its own.
    logger = TensorBoardLogger(str(tmp_path))
    logger.log_hyperparams({"lr": 1e-3})
    logger.finalize("failed")
    (events,) = (tmp_path / "lightning_logs" / "version_0").glob("events.out.tfevents.*")
    assert not has_scalars(events)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "hold no logged values" in err
