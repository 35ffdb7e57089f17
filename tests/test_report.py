"""`smix report` on synthetic run folders: hand-computed tables, a missing stage, seeds."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from smix.cli import main as smix
from smix.errors import UserError
from smix.io import RunDir
from smix.report import build_report


def pretrain_run(root: Path, name: str, method: dict, seed: int, best_err: float,
                 last_err: float, time_s: float, epochs: int = 10) -> None:
    run = RunDir(root / name)
    for e in range(1, 3):
        run.log({"epoch": e, "train_loss": 2.0 / e, "top1": 50.0 + e})
    pick = lambda err, ep: {"epoch": ep, "top1": 100 - err, "top5": 99.0, "top1_err": err, "top5_err": 1.0 + seed}
    run.write_metrics(stage="pretrain", kind="classification", results={
        "best": pick(best_err, 8), "last": pick(last_err, epochs), "arch": "resnet18",
        "dataset": "shapes", "method": method, "seed": seed, "epochs_done": epochs,
        "epochs": epochs, "train_time_s": time_s})


def ck(method: str) -> dict:
    return {"path": f"/x/{method}.safetensors", "sha256": "ab", "arch": "resnet18",
            "method": {"name": method}}


@pytest.fixture
def runs(tmp_path) -> Path:
    root = tmp_path / "runs"
    pretrain_run(root, "none-s0", {"name": "none"}, 0, 30.0, 31.0, 100.0)
    pretrain_run(root, "cutmix-s0", {"name": "cutmix", "pairing": "random"}, 0, 20.0, 21.0, 110.0)
    pretrain_run(root, "cutmix-s1", {"name": "cutmix", "pairing": "random"}, 1, 22.0, 23.0, 110.0)
    for name, method, ap50, test in (("det-none", "none", 70.0, "2007"),
                                     ("det-cutmix", "cutmix", 72.5, "2007"),
                                     ("det-cutmix-12", "cutmix", 60.0, "2012")):
        test_set, metric = (("VOC2007/test", "voc07-11point") if test == "2007"
                            else ("VOC2012/val", "voc12-area"))
        RunDir(root / name).write_metrics(stage="transfer", kind="detection", results={
            "AP50": ap50, "AP": ap50 - 30, "AP75": ap50 - 20, "backend": "torchvision",
            "preset": "d2-voc", "arch": "fpn", "iters": 100, "checkpoint": ck(method),
            "test_set": test_set, "metric": metric})
    RunDir(root / "fgsm").write_metrics(stage="robustness", kind="fgsm", results={
        "dataset": "shapes", "n_images": 40, "eps": [1, 8], "models": [
            {"checkpoint": ck("none"), "architecture": "resnet18", "clean": {"top1": 90.0},
             "adversarial": {"1": {"top1": 50.0}, "8": {"top1": 5.0}}},
            {"checkpoint": ck("cutmix"), "architecture": "resnet18", "clean": {"top1": 92.5},
             "adversarial": {"1": {"top1": 60.0}, "8": {"top1": 12.5}}}]})
    return root


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_report_tables_are_hand_computed(runs, tmp_path):
    summary = build_report([runs], tmp_path / "rep")
    rows = read_csv(tmp_path / "rep" / "classification.csv")
    assert [r["method"] for r in rows] == ["none", "cutmix(pairing=random)"]
    cut = rows[1]
    assert cut["best top-1 err"] == "21.00 ± 1.41"  # mean 21, sample std sqrt(2)
    assert cut["last top-1 err"] == "22.00 ± 1.41"
    assert cut["top-5 err @best"] == "1.50 ± 0.71"
    assert cut["runs"] == "2 (seeds 0,1)"
    assert cut["s / epoch"] == "11.0" and cut["aug. overhead"] == "+10.0%"
    assert cut["run folders"] == "cutmix-s0, cutmix-s1"
    assert rows[0]["best top-1 err"] == "30.00" and rows[0]["aug. overhead"] == "+0.0%"
    det = read_csv(tmp_path / "rep" / "detection_transfer.csv")
    # the VOC2012 run (area AP) has no `none` baseline of its own metric: no Δ against VOC07's
    assert [(d["backbone method"], d["test set / AP"], d["AP50"], d["ΔAP50 vs none"])
            for d in det] == [("none", "VOC2007/test voc07-11point", "70.00", "+0.00"),
                              ("cutmix", "VOC2007/test voc07-11point", "72.50", "+2.50"),
                              ("cutmix", "VOC2012/val voc12-area", "60.00", "–")]
    fgsm = read_csv(tmp_path / "rep" / "fgsm_robustness.csv")
    assert [(f["clean"], f["ε=1/255"], f["ε=8/255"]) for f in fgsm] == [
        ("90.00", "50.00", "5.00"), ("92.50", "60.00", "12.50")]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "Corruption" not in md and "localisation" not in md  # stages never run: no table
    assert (tmp_path / "rep" / "training_curves.png").stat().st_size > 1000
    assert (tmp_path / "rep" / "fgsm_accuracy_vs_eps.png").stat().st_size > 1000
    assert summary["runs"] == 7


def test_report_bad_input(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no metrics.json found"):
        build_report([tmp_path / "empty"], tmp_path / "rep")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "metrics.json").write_text(json.dumps({"acc": 1}))
    assert smix(["report", str(tmp_path / "foreign"), "--out", str(tmp_path / "rep")]) == 2
    assert "not a toolkit metrics.json" in capsys.readouterr().err
    assert smix(["report", str(tmp_path / "nope"), "--out", str(tmp_path / "rep")]) == 2


def test_corruption_table_marks_an_incomplete_set(tmp_path):
    from robustness.corruption import ALEXNET_ERR
    root = tmp_path / "runs"
    for name, names in (("full", list(ALEXNET_ERR)), ("part", ["fog", "snow"])):
        RunDir(root / name).write_metrics(stage="robustness", kind="corruption", results={
            "dataset": "imagenet-c", "corruptions": names,
            "corruptions_missing": [c for c in ALEXNET_ERR if c not in names],
            "complete": len(names) == 15, "models": [
                {"checkpoint": ck("none"), "architecture": "resnet18", "clean_error": 25.0,
                 "mCE": 60.0, "relative_mCE": 80.0, "mean_error": 50.0}]})
    build_report([root], tmp_path / "rep")
    rows = {r["run folder"]: r for r in read_csv(tmp_path / "rep" / "corruption_robustness.csv")}
    assert rows["full"]["mCE"] == "60.00" and rows["full"]["mean corruption err"] == "50.00"
    assert rows["part"]["mCE"] == "60.00 (incomplete: 2 of 15 corruptions)"
    assert rows["part"]["relative mCE"] == "80.00 (incomplete: 2 of 15 corruptions)"
    assert rows["part"]["clean err"] == "25.00"


def test_localisation_rows_say_their_threshold_and_geometry(tmp_path):
    root = tmp_path / "runs"
    # old: before geometry and MaxBoxAccV2
    for name, extra in (("old", {}), ("wsol", {"geometry": "square", "v2": 47.5})):
        RunDir(root / name).write_metrics(stage="cam", kind="localization", results={
            "dataset": "VOC2007 test", "n_images": 10, "iou_threshold": 0.5,
            "cam_threshold": 0.2, **{k: v for k, v in extra.items() if k != "v2"}, "models": [
                {"checkpoint": ck("none"), "method": "cam", "top1_cls": 90.0,
                 "gt_known_loc": 40.0, "top1_loc": 38.0, "maxboxacc": 45.0,
                 **({"maxboxacc_v2": extra["v2"]} if "v2" in extra else {}),
                 "pointing_game": 50.0}]})
    build_report([root], tmp_path / "rep")
    rows = {r["run folder"]: r for r in read_csv(tmp_path / "rep" / "weakly_supervised_localisation_from_cams.csv")}
    assert rows["old"]["threshold / geometry"] == "0.20 / crop"
    assert rows["wsol"]["threshold / geometry"] == "0.20 / square"
    assert rows["wsol"]["MaxBoxAcc"] == "45.00"
    assert (rows["wsol"]["MaxBoxAccV2"], rows["old"]["MaxBoxAccV2"]) == ("47.50", "–")


def test_unfinished_and_other_recipe_runs_are_not_averaged(tmp_path):
    """metrics.json is rewritten every epoch: a run stopped at epoch 3 of 200 must not pull
    the finished seeds' mean (4.0, 4.2 and 60 averaged would read 22.73 ± 32.27)."""
    root = tmp_path / "runs"
    method = {"name": "saliencymix"}
    for name, seed, err, done, total, batch in (("s0", 0, 4.0, 200, 200, 128),
                                                ("s1", 1, 4.2, 200, 200, 128),
                                                ("s2", 2, 60.0, 3, 200, 128),
                                                ("b256", 3, 5.0, 200, 200, 256),
                                                ("short", 4, 9.0, 100, 100, 128)):
        pretrain_run(root, name, method, seed, err, err, 10.0 * done, epochs=done)
        m = json.loads((root / name / "metrics.json").read_text())
        m["results"]["epochs"] = total
        m["config"] = {"preset": "cifar10-r18", "batch_size": batch, "epochs": total, "seed": seed}
        (root / name / "metrics.json").write_text(json.dumps(m))
    build_report([root], tmp_path / "rep")
    rows = {r["run folders"]: r for r in read_csv(tmp_path / "rep" / "classification.csv")}
    assert set(rows) == {"s0, s1", "s2", "b256", "short"}
    assert rows["s0, s1"]["best top-1 err"] == "4.10 ± 0.14"
    assert rows["s0, s1"]["runs"] == "2 (seeds 0,1)"
    assert rows["s2"]["best top-1 err"] == "60.00 (incomplete: 3 of 200 epochs)"
    assert rows["b256"]["best top-1 err"] == "5.00"
    assert rows["b256"]["recipe"] == "preset=cifar10-r18, batch_size=256"
    assert rows["short"]["epochs"] == "100" and rows["short"]["best top-1 err"] == "9.00"


def test_runs_of_one_seed_are_one_sample(tmp_path):
    """A resumed run and its uninterrupted twin, or a copied run folder, share a seed: they are
    repeats, and averaged as two more samples they shrank the std (seeds 0, 1, 1 with errors
    20, 22, 22 read 21.33 ± 1.15; over the seeds 0 and 1 it is 21.00 ± 1.41)."""
    root = tmp_path / "runs"
    for name, seed, err in (("s0", 0, 20.0), ("s1", 1, 22.0), ("s1-resumed", 1, 22.0)):
        pretrain_run(root, name, {"name": "cutmix"}, seed, err, err + 1, 100.0)
    build_report([root], tmp_path / "rep")
    (row,) = read_csv(tmp_path / "rep" / "classification.csv")
    assert row["runs"] == "3 (seeds 0,1,1) (repeats of a seed count once)"
    assert row["best top-1 err"] == "21.00 ± 1.41" and row["last top-1 err"] == "22.00 ± 1.41"
    # top-5 err is 1 + seed: per seed 1 and 2
    assert row["top-5 err @best"] == "1.50 ± 0.71"


def test_fgsm_curves_of_several_datasets_say_which(tmp_path, monkeypatch):
    """CIFAR-10 and CIFAR-100 runs on one set of axes: each legend entry names its dataset (it
    named only the run and checkpoint); runs of one dataset keep the short label."""
    import smix.report as report_mod
    from smix.report import find_runs, plot_eps

    legends = []

    def keep_labels(fig, path):
        legends.append(fig.axes[0].get_legend_handles_labels()[1])

    monkeypatch.setattr(report_mod, "_save_png", keep_labels)
    root = tmp_path / "runs"
    for name, dataset in (("c10", "cifar10"), ("c100", "cifar100")):
        RunDir(root / name).write_metrics(stage="robustness", kind="fgsm", results={
            "dataset": dataset, "n_images": 4, "models": [
                {"checkpoint": ck("cutmix"), "clean": {"top1": 90.0},
                 "adversarial": {"8": {"top1": 50.0}}}]})
    runs = find_runs([root / "c10", root / "c100"])
    plot_eps(runs, tmp_path)
    plot_eps(runs[:1], tmp_path)
    assert legends == [["cutmix [c10: x/cutmix.safetensors] on cifar10",
                        "cutmix [c100: x/cutmix.safetensors] on cifar100"],
                       ["cutmix [c10: x/cutmix.safetensors]"]]


def test_report_odd_input_is_one_line_or_a_dash(tmp_path, capsys):
    """Policy: a metrics.json that is no toolkit record stops the report with one line naming
    it; a well-formed record missing a value gets "–", and log lines missing one are not plotted."""
    def report(*paths: Path, out: Path = tmp_path / "rep") -> str:
        assert smix(["report", *map(str, paths), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "Traceback" not in err
        return err

    for name, payload in (("list", b"[1, 2]"), ("latin1", '{"a": "é"}'.encode("latin-1")),
                          ("results", b'{"format": "smix.metrics/1", "results": [1]}')):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_bytes(payload)
        assert f"{name}/metrics.json" in report(tmp_path / name)
    root = tmp_path / "runs"
    pretrain_run(root, "nolast", {"name": "none"}, 0, 30.0, 31.0, 100.0)
    m = json.loads((root / "nolast" / "metrics.json").read_text())
    del m["results"]["last"]
    (root / "nolast" / "metrics.json").write_text(json.dumps(m))
    RunDir(root / "nolast").log({"epoch": 3, "note": "a record without loss or top-1"})
    RunDir(root / "fgsm").write_metrics(stage="robustness", kind="fgsm", results={
        "dataset": "shapes", "n_images": 4, "models": [
            {"checkpoint": ck("none"), "clean": {"top1": 90.0},
             "adversarial": {"1": {"top1": 50.0}, "8": {"error": "skipped"}}}]})
    (tmp_path / "afile").write_text("x")
    assert "afile" in report(root, out=tmp_path / "afile")
    build_report([root], tmp_path / "rep")
    row = read_csv(tmp_path / "rep" / "classification.csv")[0]
    assert row["best top-1 err"] == "30.00" and row["last top-1 err"] == "–"
    assert (tmp_path / "rep" / "training_curves.png").is_file()
    assert (tmp_path / "rep" / "fgsm_accuracy_vs_eps.png").is_file()


def test_groups_by_dataset_top5_is_the_best_epochs_and_delta_is_against_the_seed_mean(tmp_path):
    """Hand-computed cells: runs of one method on two datasets are two rows, never averaged
    (CIFAR-10 5.0 and CIFAR-100 25.0 would read 15.00 ± 14.14); `top-5 err @best` is the top-5
    error of the best top-1 epoch (2.0, 3.0 -> 2.50 ± 0.71), not the last epoch's (7.0, 9.0);
    ΔAP50 is against the mean of the `none` backbones' seeds ((70 + 72) / 2 = 71)."""
    root = tmp_path / "runs"
    epoch = lambda ep, top1_err, top5_err: {"epoch": ep, "top1_err": top1_err,
                                            "top5_err": top5_err}
    for name, dataset, seed, best1, best5, last5 in (("c10-s0", "cifar10", 0, 5.0, 2.0, 7.0),
                                                     ("c10-s1", "cifar10", 1, 6.0, 3.0, 9.0),
                                                     ("c100-s0", "cifar100", 0, 25.0, 8.0, 8.5)):
        RunDir(root / name).write_metrics(stage="pretrain", kind="classification", results={
            "best": epoch(5, best1, best5), "last": epoch(10, best1 + 1, last5),
            "arch": "resnet18", "dataset": dataset, "method": {"name": "cutmix"}, "seed": seed,
            "epochs_done": 10, "epochs": 10, "train_time_s": 100.0})
    for name, method, ap50 in (("none-s0", "none", 70.0), ("none-s1", "none", 72.0),
                               ("cutmix", "cutmix", 74.5)):
        RunDir(root / name).write_metrics(stage="transfer", kind="detection", results={
            "AP50": ap50, "AP": 40.0, "AP75": 45.0, "backend": "torchvision", "preset": "d2-voc",
            "arch": "fpn", "iters": 100, "checkpoint": ck(method), "test_set": "VOC2007/test",
            "metric": "voc07-11point"})
    build_report([root], tmp_path / "rep")
    rows = {r["dataset"]: r for r in read_csv(tmp_path / "rep" / "classification.csv")}
    assert set(rows) == {"cifar10", "cifar100"}
    assert rows["cifar10"]["best top-1 err"] == "5.50 ± 0.71"
    assert rows["cifar10"]["top-5 err @best"] == "2.50 ± 0.71"
    assert rows["cifar10"]["last top-5 err"] == "8.00 ± 1.41"
    assert rows["cifar100"]["best top-1 err"] == "25.00" and rows["cifar100"]["runs"] == "1"
    det = {d["run folder"]: d["ΔAP50 vs none"]
           for d in read_csv(tmp_path / "rep" / "detection_transfer.csv")}
    assert det == {"none-s0": "-1.00", "none-s1": "+1.00", "cutmix": "+3.50"}


def test_two_audits_keep_a_csv_each(tmp_path):
    """Each audit's detector table is its own CSV: the name was cut at the title's "(%)", before
    the run tag, so the second audit's overwrote the first's (and report.json listed it twice)."""
    root = tmp_path / "runs"
    for name, rate in (("audA", 0.25), ("audB", 0.75)):
        RunDir(root / name).write_metrics(stage="audit", kind="audit", results={
            "dataset": "VOC2007 test", "images": 4, "methods": [], "detectors": {
                "spectral_residual": {"hit_rate": rate, "chance": 0.5, "energy_in_box": 0.5,
                                      "images": 4}}})
    summary = build_report([root], tmp_path / "rep")
    assert len(summary["tables"]) == len(set(summary["tables"])) == 2
    hits = {Path(p).name: read_csv(Path(p))[0]["hit rate"] for p in summary["tables"]}
    assert hits == {"audit_saliency_detectors_auda.csv": "25.0",
                    "audit_saliency_detectors_audb.csv": "75.0"}


def test_two_audits_in_folders_of_one_name_keep_their_own_files(tmp_path):
    """runs/a/audit and runs/b/audit: tagged by their folder name alone, both wrote the same
    CSVs and summary plot, so the report showed the second audit's plot twice."""
    root = tmp_path / "runs"
    for name, rate in (("a", 0.25), ("b", 0.75)):
        RunDir(root / name / "audit").write_metrics(stage="audit", kind="audit", results={
            "dataset": "VOC2007 test", "images": 4, "detectors": {
                "spectral_residual": {"hit_rate": rate, "chance": 0.5, "energy_in_box": 0.5,
                                      "images": 4}},
            "methods": [{"title": "mixup", "pairs": 4, "mean_lambda": 0.5,
                         "target_object_visible": rate, "source_object_visible": 0.5,
                         "label_evidence_gap": 0.0, "empty_source_rate": 0.0,
                         "erased_target_rate": 0.0}]})
    summary = build_report([root], tmp_path / "rep")
    assert len(summary["tables"]) == len(set(summary["tables"])) == 4
    assert len(summary["plots"]) == len(set(summary["plots"])) == 2
    assert all(Path(p).is_file() for p in summary["tables"] + summary["plots"])
    hits = sorted(read_csv(Path(p))[0]["hit rate"] for p in summary["tables"]
                  if "detectors" in Path(p).name)
    assert hits == ["25.0", "75.0"]


def test_an_audit_record_lacking_values_shows_dashes(tmp_path):
    """The report's policy for a well-formed record lacking a value ("–" in its cell) holds
    for audits too: their tables and summary plot indexed every value and raised KeyError."""
    root = tmp_path / "runs"
    RunDir(root / "aud").write_metrics(stage="audit", kind="audit", results={
        "dataset": "VOC2007 test", "images": 4, "methods": [{"title": "mixup", "pairs": 4}],
        "detectors": {"spectral_residual": {"hit_rate": 0.5, "images": 4}}})
    summary = build_report([root], tmp_path / "rep")
    det = read_csv(tmp_path / "rep" / "audit_saliency_detectors.csv")[0]
    assert (det["hit rate"], det["chance"], det["hit − chance (pp)"]) == ("50.0", "–", "–")
    mix = read_csv(tmp_path / "rep" / "audit_mixing_methods.csv")[0]
    assert (mix["method"], mix["pairs"], mix["mean λ"], mix["label-evidence gap"]) == \
        ("mixup", "4", "–", "–")
    assert (tmp_path / "rep" / "audit_summary.png").is_file()
    assert len(summary["tables"]) == 2


def test_cifar_c_rows_do_not_call_a_missing_mce_incomplete(tmp_path):
    """CIFAR-C has no mCE (no AlexNet reference) whatever its corruptions: an incomplete CIFAR-C
    run's mCE cells are '–', not '– (incomplete: …)' (which reads as if a full set gave one);
    the note stays on the numbers that were averaged over the subset."""
    from robustness.corruption import ALEXNET_ERR
    root = tmp_path / "runs"
    RunDir(root / "c10c").write_metrics(stage="robustness", kind="corruption", results={
        "dataset": "CIFAR-10-C", "layout": "cifar-c", "corruptions": ["snow", "contrast"],
        "corruptions_missing": [c for c in ALEXNET_ERR if c not in ("snow", "contrast")],
        "complete": False, "mce_reference": None, "models": [
            {"checkpoint": ck("cutmix"), "architecture": "cifar_resnet18", "clean_error": 5.0,
             "mCE": None, "relative_mCE": None, "mean_error": 20.0}]})
    build_report([root], tmp_path / "rep")
    row = read_csv(tmp_path / "rep" / "corruption_robustness.csv")[0]
    assert row["mCE"] == "–" and row["relative mCE"] == "–"
    assert row["mean corruption err"] == "20.00 (incomplete: 2 of 15 corruptions)"
    assert row["checkpoint"] == "x/cutmix.safetensors"


def test_attack_rows_name_their_checkpoint(tmp_path):
    """Two checkpoints of one method in one run (a run's best and last, two pretrain runs) are
    two rows with the same method, arch and run folder: the checkpoint column (its folder and
    file, as the CLI prints it) tells them apart, in the table and in the plot's legend."""
    root = tmp_path / "runs"
    best = dict(ck("saliencymix"), path="/r/c10-smix/best.safetensors")
    last = dict(ck("saliencymix"), path="/r/c10-smix/backbone.safetensors")
    RunDir(root / "pgd").write_metrics(stage="robustness", kind="pgd", results={
        "dataset": "cifar10", "n_images": 20, "eps": [4], "models": [
            {"checkpoint": best, "architecture": "cifar_resnet18", "clean": {"top1": 15.0},
             "adversarial": {"4": {"top1": 0.0}}},
            {"checkpoint": last, "architecture": "cifar_resnet18", "clean": {"top1": 10.0},
             "adversarial": {"4": {"top1": 0.0}}}]})
    build_report([root], tmp_path / "rep")
    rows = read_csv(tmp_path / "rep" / "pgd_robustness.csv")
    assert [(r["checkpoint"], r["clean"]) for r in rows] == [
        ("c10-smix/best.safetensors", "15.00"), ("c10-smix/backbone.safetensors", "10.00")]
