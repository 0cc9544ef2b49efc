"""The model zoo: metadata table, name resolution, safe checkpoint loading, `adt-ft models` and `adt-ft pull`.

No test touches the network: checkpoints are written into the workspace first
(random weights of the right architecture), and the download tests make every
socket fail so they exercise RobustBench's real download code offline.
"""
from __future__ import annotations

import json
import random
import socket
from pathlib import Path

import pytest
import torch
from torch import nn

from adt_finetune.errors import UserError
from adt_finetune.models import SmallCNN
from adt_finetune.workspace import ModelRef, Workspace
from adt_finetune.zoo import (ALIASES, build_architecture, catalog, load_model, load_weights, model_from_ref,
                              pull_from_file, read_state_dict, register_model, resolve_name, search)

SMALL_CNN = "adt_finetune.models.small:SmallCNN"
RN18_ENTRY = "Addepalli2021Towards_RN18"  # a small (ResNet-18) single-file cifar10/Linf zoo entry


def assert_user_error(result, *needles):
    """Exit 2, exactly one line on stderr containing every needle, and no traceback anywhere."""
    code, out, err = result
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture
def no_network(monkeypatch):
    """Every connection attempt fails at once (and is recorded), whatever this machine's network is."""
    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:] if args and isinstance(args[0], socket.socket) else args)
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


@pytest.fixture(scope="session")
def zhang_workspace(tmp_path_factory):
    """A workspace holding a random-weights WRN-34-10 at RobustBench's path for Zhang2019Theoretically.

    Built once: the architecture has 46M parameters (a 180 MB file)."""
    ws = tmp_path_factory.mktemp("zhang_ws")
    model = build_architecture("Zhang2019Theoretically", "cifar10")
    path = Workspace(ws).model_path("cifar10", "Linf", "Zhang2019Theoretically")
    path.parent.mkdir(parents=True)
    torch.save(model.state_dict(), path)
    probe_key = next(k for k, v in model.state_dict().items() if v.dtype.is_floating_point)
    return ws, sum(p.numel() for p in model.parameters()), probe_key, model.state_dict()[probe_key].clone()


@pytest.fixture
def small_ckpt(tmp_path):
    """A SmallCNN(width=8) checkpoint file and the model it came from."""
    torch.manual_seed(1)
    model = SmallCNN(width=8).eval()
    path = tmp_path / "small.pt"
    torch.save(model.state_dict(), path)
    return path, model


class _WritesMarker:
    """A pickle payload: unpickling it calls open(marker, 'w'), i.e. creates a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _hostile_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"conv.weight": torch.zeros(2), "payload": _WritesMarker(marker)}, path)
    return path


# ---------------------------------------------------------------- metadata table

# Names RobustBench can load whose model_info is not in the shipped table. A new
# uncovered name that is not listed here fails the coverage test.
KNOWN_UNCOVERED: dict[tuple[str, str], set[str]] = {}


def test_table_covers_every_robustbench_linf_model():
    from adt_finetune.zoo.robustbench_compat import model_dicts

    dicts = model_dicts()
    for ds_enum, by_tm in dicts.items():
        if ds_enum.value not in ("cifar10", "cifar100", "imagenet"):
            continue
        records = {tm.value: recs for tm, recs in by_tm.items()}["Linf"]
        table = {e.name: e for e in catalog(ds_enum.value, "Linf")}
        uncovered = {n for n in records if n not in table or table[n].clean_acc is None}
        assert uncovered == KNOWN_UNCOVERED.get((ds_enum.value, "Linf"), set()), (ds_enum.value, uncovered)
        for name, rec in records.items():
            gid = rec["gdrive_id"]
            if isinstance(gid, list):
                kind = "ensemble"
            else:
                kind = {None: "timm", "": "torchvision"}.get(gid, "gdrive")
            assert table[name].checkpoint == kind, name
            assert table[name].gdrive_id == {"ensemble": tuple(gid or ()), "gdrive": gid}.get(kind), name
        # Leaderboard-only entries are in the table but marked as not loadable.
        assert all(e.loadable == (e.name in records) for e in table.values())


def test_table_matches_robustbench_model_info_files():
    folder = Path(__file__).resolve().parents[2] / "shared" / "data" / "robustbench-model-info"
    source = json.loads((folder / "cifar10" / "Linf" / "Zhang2019Theoretically.json").read_text()) \
        if folder.is_dir() else None
    entry = resolve_name("Zhang2019Theoretically")
    if source is not None:
        assert entry.clean_acc == float(source["clean_acc"])
        assert entry.autoattack_acc == float(source["autoattack_acc"])
        assert entry.architecture == source["architecture"]
        assert entry.title == source["name"]
    assert entry.eps == pytest.approx(0.031)  # model_info writes this one as "0.031", most as "8/255"
    assert resolve_name("Carmon2019Unlabeled").eps == pytest.approx(8 / 255)


def test_make_model_table_parses_model_info(tmp_path):
    """The generator on a miniature model_info tree: string accuracies, '8/255' and '0.031', nulls."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    try:
        import make_model_table
    finally:
        sys.path.pop(0)
    base = {"link": "l", "authors": "a", "additional_data": True, "number_forward_passes": 1, "dataset": "cifar10",
            "venue": "v", "architecture": "WideResNet-34-10", "reported": "null", "footnote": None}
    folder = tmp_path / "info" / "cifar10" / "Linf"
    folder.mkdir(parents=True)
    (folder / "Zhang2019Theoretically.json").write_text(json.dumps(
        {**base, "name": "T", "eps": "0.031", "clean_acc": "84.92", "autoattack_acc": "53.08"}))
    (folder / "OnlyOnLeaderboard.json").write_text(json.dumps(
        {**base, "name": "U", "eps": "8/255", "clean_acc": "90.5", "autoattack_acc": "1.25"}))
    out = tmp_path / "table.json"
    assert make_model_table.main([str(tmp_path / "info"), "--out", str(out)]) == 0
    raw = json.loads(out.read_text())
    rows = {r[0]: dict(zip(raw["columns"], r)) for r in raw["models"]["cifar10"]["Linf"]}
    assert rows["Zhang2019Theoretically"]["clean_acc"] == 84.92
    assert rows["Zhang2019Theoretically"]["eps"] == pytest.approx(0.031)
    assert rows["Zhang2019Theoretically"]["checkpoint"] == "gdrive"
    assert rows["OnlyOnLeaderboard"]["eps"] == pytest.approx(8 / 255)
    assert rows["OnlyOnLeaderboard"]["reported"] is None and rows["OnlyOnLeaderboard"]["checkpoint"] is None
    # Names RobustBench can load but the miniature tree lacks are still listed.
    assert "Carmon2019Unlabeled" in rows and rows["Carmon2019Unlabeled"]["clean_acc"] is None


# ---------------------------------------------------------------- name resolution

def test_resolve_exact_alias_case_and_prefix():
    assert resolve_name("Zhang2019Theoretically").name == "Zhang2019Theoretically"
    assert ALIASES["Zhang2019"] == "Zhang2019Theoretically"
    assert resolve_name("Zhang2019").name == "Zhang2019Theoretically"
    assert resolve_name("zhang2019you").name == "Zhang2019You"
    assert resolve_name("carmon").name == "Carmon2019Unlabeled"
    e = resolve_name("chen2020eff", "cifar-100", "linf")
    assert (e.name, e.dataset, e.threat_model) == ("Chen2020Efficient", "cifar100", "Linf")


def test_resolve_errors_list_candidates():
    with pytest.raises(UserError) as ambiguous:
        resolve_name("Wang")
    msg = str(ambiguous.value)
    assert "Wang2020Improving (WideResNet-28-10, AA 56.29%)" in msg and "Wang2023Better_WRN-70-16" in msg
    with pytest.raises(UserError) as unknown:
        resolve_name("Zhang2091")
    assert "did you mean" in str(unknown.value) and "Zhang2019You" in str(unknown.value)
    with pytest.raises(UserError, match="no 'fashion-mnist' models"):
        resolve_name("Zhang2019", "fashion-mnist")
    with pytest.raises(UserError, match="cifar100 models for threat model 'L2'"):
        resolve_name("Zhang2019", "cifar100", "L2")


def test_search_matches_name_alias_architecture_title():
    assert [e.name for e in search("trades")] == ["Zhang2019Theoretically"]  # through the TRADES alias
    assert all("70-16" in e.architecture or "70_16" in e.name or "70-16" in e.name for e in search("70-16"))
    assert {e.name for e in search("principled trade-off")} == {"Zhang2019Theoretically"}
    assert len(search(None)) == len(catalog("cifar10", "Linf")) > 50


# ---------------------------------------------------------------- checkpoints

def test_read_state_dict_unwraps_wrappers_and_prefixes(tmp_path, small_ckpt):
    _, model = small_ckpt
    sd = model.state_dict()
    variants = {
        "plain": sd,
        "state_dict+module": {"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3},
        "model_state_dict": {"model_state_dict": sd, "optimizer": {"lr": 0.1}},
        "model+model.": {"model": {"model." + k: v for k, v in sd.items()}},
    }
    for label, obj in variants.items():
        path = tmp_path / f"{label}.pt"
        torch.save(obj, path)
        loaded = read_state_dict(path)
        assert set(loaded) == set(sd), label
        fresh = load_weights(SmallCNN(width=8), loaded, label)
        assert torch.equal(fresh.fc.weight, model.fc.weight), label


def test_load_weights_puts_back_a_model_prefix(small_ckpt):
    class Wrapped(nn.Module):  # like RobustBench's normalising ImageNet wrappers
        def __init__(self):
            super().__init__()
            self.model = SmallCNN(width=8)

    path, model = small_ckpt
    wrapped = load_weights(Wrapped(), read_state_dict(path), str(path))
    assert torch.equal(wrapped.model.fc.weight, model.fc.weight)


def test_hostile_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "marker"
    path = _hostile_checkpoint(tmp_path / "evil.pt", marker)
    with pytest.raises(UserError, match="refused: .* contains code/objects, not just tensors"):
        read_state_dict(path)
    assert not marker.exists()
    # The payload is real: an unsafe load does create the marker.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_corrupt_and_truncated_checkpoints(tmp_path, small_ckpt):
    path, _ = small_ckpt
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match="corrupt or truncated"):
        read_state_dict(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(4096)))
    with pytest.raises(UserError, match="corrupt or truncated"):
        read_state_dict(garbage)
    not_state = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_state)
    with pytest.raises(UserError, match="not a state dict"):
        read_state_dict(not_state)


def test_build_architecture_import_spec_and_kwargs():
    model = build_architecture(SMALL_CNN, "fashion-mnist", arch_kwargs={"width": 8})
    assert model.fc.in_features == 128 and model.features[0].out_channels == 8
    with pytest.raises(UserError, match="cannot import module 'no_such_pkg"):
        build_architecture("no_such_pkg.mod:Net", "cifar10")
    with pytest.raises(UserError, match="has no attribute 'Nope'"):
        build_architecture("adt_finetune.models.small:Nope", "cifar10")
    with pytest.raises(UserError, match="cannot construct"):
        build_architecture(SMALL_CNN, "cifar10", arch_kwargs={"depth": 3})
    with pytest.raises(UserError, match="only apply to package.module:Class"):
        build_architecture("Zhang2019", "cifar10", arch_kwargs={"width": 8})


def test_register_model_round_trip(tmp_path, fmnist_test):
    torch.manual_seed(2)
    model = SmallCNN(width=16)
    with torch.no_grad():
        model.train()(fmnist_test[0][:64])  # non-default BatchNorm statistics, so buffers must round-trip too
    model.eval()
    ref = register_model(model, name="fmnist-cnn", arch=SMALL_CNN, arch_kwargs={"width": 16},
                         dataset="fashion-mnist", workspace=tmp_path)
    assert Path(ref.path) == tmp_path.resolve() / "models" / "fashion-mnist" / "Linf" / "fmnist-cnn.pt"
    assert (ref.source, ref.arch_kwargs) == ("local", {"width": 16})
    assert Workspace(tmp_path).current_model() == ref
    rebuilt = model_from_ref(Workspace(tmp_path).current_model())
    x = fmnist_test[0][:16]
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    assert not rebuilt.training
    with pytest.raises(UserError, match="plain file name"):
        register_model(model, name="../escape", arch=SMALL_CNN, dataset="fashion-mnist", workspace=tmp_path)


def test_load_model_from_path_or_zoo_name_leaves_state_alone(tmp_path, small_ckpt, no_network, monkeypatch):
    path, model = small_ckpt
    loaded = load_model(path, dataset="fashion-mnist", arch=SMALL_CNN, arch_kwargs={"width": 8}, workspace=tmp_path)
    assert torch.equal(loaded.fc.weight, model.fc.weight) and not loaded.training
    with pytest.raises(UserError, match="also give its architecture"):
        load_model(path, workspace=tmp_path)
    # A zoo name whose checkpoint is in the workspace: loaded from there, no network, state untouched.
    monkeypatch.delenv("ADT_FT_OFFLINE", raising=False)
    rn18 = build_architecture(RN18_ENTRY, "cifar10")
    zoo_path = Workspace(tmp_path).model_path("cifar10", "Linf", RN18_ENTRY)
    zoo_path.parent.mkdir(parents=True)
    torch.save({"state_dict": {"module." + k: v for k, v in rn18.state_dict().items()}}, zoo_path)
    from_zoo = load_model("addepalli2021towards_rn", workspace=tmp_path)
    for (k, v), w in zip(rn18.state_dict().items(), from_zoo.state_dict().values()):
        assert torch.equal(v, w), k
    assert no_network == []
    assert Workspace(tmp_path).current_model() is None


def test_model_from_ref_missing_file_is_user_error(tmp_path):
    ref = ModelRef(name="gone", arch=SMALL_CNN, dataset="fashion-mnist", path=str(tmp_path / "gone.pt"),
                   source="file")
    with pytest.raises(UserError, match="missing at"):
        model_from_ref(ref)


# ---------------------------------------------------------------- adt-ft models

def test_models_lists_matches_with_reported_numbers(cli, tmp_path):
    code, out, err = cli("models", "trades", "-w", tmp_path)
    assert code == 0, err
    assert "Zhang2019Theoretically" in out and "84.92" in out and "53.08" in out
    # "in workspace" follows the files in models/<dataset>/<threat>/.
    ws = Workspace(tmp_path)
    ws.model_path("cifar10", "Linf", "Zhang2019You").parent.mkdir(parents=True)
    ws.model_path("cifar10", "Linf", "Zhang2019You").write_bytes(b"x")
    code, out, _ = cli("models", "zhang2019", "-w", tmp_path)
    rows = {line.split()[1]: line for line in out.splitlines() if "Zhang2019" in line and "│" in line}
    assert rows["Zhang2019You"].rstrip(" │").endswith("yes")
    assert rows["Zhang2019Theoretically"].rstrip(" │").endswith("no")


def test_models_bad_dataset(cli, tmp_path):
    assert_user_error(cli("models", "--dataset", "svhn", "-w", tmp_path), "no 'svhn' models")


# ---------------------------------------------------------------- adt-ft pull: done-when

def test_pull_alias_loads_placed_checkpoint_without_network(cli, zhang_workspace, no_network, monkeypatch):
    ws, n_params, probe_key, probe = zhang_workspace
    monkeypatch.delenv("ADT_FT_OFFLINE", raising=False)  # a download, were one attempted, would hit the guard
    code, out, err = cli("pull", "Zhang2019", "-w", ws)
    assert code == 0, err
    assert no_network == []
    assert "Zhang2019 resolved to Zhang2019Theoretically" in out
    assert f"{n_params:,}" in out and "WideResNet-34-10" in out and "84.92" in out and "53.08" in out
    ref = Workspace(ws).current_model()
    expected = Workspace(ws).model_path("cifar10", "Linf", "Zhang2019Theoretically")
    assert (ref.name, ref.arch, ref.source, Path(ref.path)) == ("Zhang2019Theoretically", "Zhang2019Theoretically",
                                                                "zoo", expected)
    assert Path(ref.path).is_absolute() and str(expected) in out
    # The current model rebuilds to exactly the placed weights.
    model = model_from_ref(ref)
    assert torch.equal(model.state_dict()[probe_key], probe)
    assert no_network == []


def test_pull_from_file_pyautoattack_resnet18(cli, tmp_path, pyautoattack_checkpoint, cifar10_pngs):
    from PIL import Image
    from pyautoattack.examples.resnet import ResNet18

    ckpt = pyautoattack_checkpoint
    code, out, err = cli("pull", "--from-file", ckpt, "--arch", "pyautoattack.examples.resnet:ResNet18",
                         "--dataset", "cifar10", "-w", tmp_path)
    assert code == 0, err
    assert f"{sum(p.numel() for p in ResNet18().parameters()):,}" in out
    ref = Workspace(tmp_path).current_model()
    assert (ref.source, ref.name, ref.path, ref.dataset) == ("file", "model_test", str(ckpt.resolve()), "cifar10")
    # Real weights on real CIFAR-10 test images: far above chance.
    import numpy as np

    files = cifar10_pngs
    x = torch.stack([torch.tensor(np.asarray(Image.open(f).convert("RGB"))).permute(2, 0, 1)
                     for f in files]).float() / 255
    y = torch.tensor([int(f.stem.split("_")[2]) for f in files])
    with torch.no_grad():
        acc = (model_from_ref(ref)(x).argmax(1) == y).float().mean().item()
    assert acc >= 0.8, acc


def test_pull_from_file_library_records_zoo_arch(tmp_path, small_ckpt):
    path, _ = small_ckpt
    with pytest.raises(UserError, match="do not fit SmallCNN"):
        pull_from_file(path, SMALL_CNN, dataset="fmnist", workspace=tmp_path)
    ref = pull_from_file(path, SMALL_CNN, dataset="fmnist", workspace=tmp_path, name="mine",
                         arch_kwargs={"width": 8})
    assert (ref.name, ref.dataset, ref.arch_kwargs) == ("mine", "fashion-mnist", {"width": 8})
    assert Workspace(tmp_path).current_model() == ref


# ---------------------------------------------------------------- adt-ft pull: bad input

def test_pull_unknown_name_suggests_close_matches(cli, tmp_path):
    assert_user_error(cli("pull", "Zhang2091", "-w", tmp_path), "unknown model 'Zhang2091'", "Zhang2019You")


def test_pull_ambiguous_prefix_lists_candidates(cli, tmp_path):
    assert_user_error(cli("pull", "Wang", "-w", tmp_path), "ambiguous", "Wang2020Improving (WideResNet-28-10, AA")


def test_pull_dataset_or_threat_model_not_in_zoo(cli, tmp_path):
    assert_user_error(cli("pull", "Zhang2019", "--dataset", "fashion-mnist", "-w", tmp_path), "no 'fashion-mnist'")
    assert_user_error(cli("pull", "Zhang2019", "--dataset", "cifar100", "--threat-model", "L2", "-w", tmp_path),
                      "threat model 'L2'", "cifar100: Linf, corruptions")


def test_pull_absent_offline_names_the_path(cli, tmp_path):
    expected = Workspace(tmp_path).model_path("cifar10", "Linf", "Zhang2019You")
    assert_user_error(cli("pull", "Zhang2019You", "-w", tmp_path), f"place the checkpoint", str(expected))
    assert not expected.exists() and Workspace(tmp_path).current_model() is None


def test_pull_failed_download_leaves_nothing(cli, tmp_path, no_network, monkeypatch):
    """RobustBench's real loader and download code, with every socket failing."""
    monkeypatch.delenv("ADT_FT_OFFLINE", raising=False)
    expected = Workspace(tmp_path).model_path("cifar10", "Linf", RN18_ENTRY)
    assert_user_error(cli("pull", RN18_ENTRY, "-w", tmp_path), "download failed", str(expected))
    assert no_network, "the download was never attempted"
    assert not (tmp_path / "models").exists()  # not even the empty folders made for the file
    assert Workspace(tmp_path).current_model() is None


@pytest.mark.parametrize("payload", ["partial", "html", "hostile"])
def test_pull_bad_downloads_are_removed(cli, tmp_path, monkeypatch, payload):
    """What a download can leave behind: half a file, Google Drive's HTML page, a code pickle."""
    from adt_finetune.zoo.robustbench_compat import robustbench_utils

    monkeypatch.delenv("ADT_FT_OFFLINE", raising=False)
    marker = tmp_path / "marker"

    def fake_download(gdrive_id, fname_save):
        fname = Path(fname_save)
        if payload == "partial":
            fname.write_bytes(b"PK\x03\x04" + b"\0" * 1000)
            raise ConnectionError("connection reset by peer")
        if payload == "html":
            fname.write_text("<!DOCTYPE html><html><head><title>Google Drive - Quota exceeded</title></head></html>")
        else:
            _hostile_checkpoint(fname, marker)

    monkeypatch.setattr(robustbench_utils(), "download_gdrive_new", fake_download)
    expected = Workspace(tmp_path).model_path("cifar10", "Linf", RN18_ENTRY)
    needle = {"partial": "connection reset", "html": "HTML page", "hostile": "refused"}[payload]
    assert_user_error(cli("pull", RN18_ENTRY, "-w", tmp_path), needle)
    assert not expected.parent.exists() and not (tmp_path / "models").exists()
    assert not marker.exists()


def test_pull_html_placed_as_checkpoint(cli, tmp_path):
    path = Workspace(tmp_path).model_path("cifar10", "Linf", "Zhang2019Theoretically")
    path.parent.mkdir(parents=True)
    path.write_text("\n<!DOCTYPE html>\n<html><body>Google Drive can't scan this file for viruses.</body></html>")
    assert_user_error(cli("pull", "Zhang2019", "-w", tmp_path), "is an HTML page, not a checkpoint", str(path))
    assert Workspace(tmp_path).current_model() is None


def test_pull_from_file_keys_that_do_not_fit(cli, tmp_path, small_ckpt):
    path, _ = small_ckpt
    err = assert_user_error(cli("pull", "--from-file", path, "--arch", SMALL_CNN, "--dataset", "fashion-mnist",
                                "-w", tmp_path), "do not fit SmallCNN", "shape mismatches", "features.0.weight")
    assert "(8, 1, 3, 3) vs (32, 1, 3, 3)" in err
    renamed = {("head." + k[3:] if k.startswith("fc.") else k): v for k, v in torch.load(path).items()}
    torch.save(renamed, tmp_path / "renamed.pt")
    assert_user_error(cli("pull", "--from-file", tmp_path / "renamed.pt", "--arch", SMALL_CNN, "--dataset",
                          "fashion-mnist", "-w", tmp_path), "missing keys fc.weight", "unexpected keys head.weight")


def test_pull_from_file_hostile_pickle(cli, tmp_path):
    marker = tmp_path / "marker"
    path = _hostile_checkpoint(tmp_path / "evil.pt", marker)
    assert_user_error(cli("pull", "--from-file", path, "--arch", SMALL_CNN, "--dataset", "fashion-mnist",
                          "-w", tmp_path), "refused", "contains code/objects, not just tensors")
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["nan", "negative running_var"])
def test_pull_refuses_unusable_weights(cli, tmp_path, damage):
    """NaN weights (or a negative BatchNorm variance) are refused at pull, not later by training
    ("diverged: lower --lr") or evaluation; the model does not become current."""
    state = SmallCNN().state_dict()
    key = "fc.weight" if damage == "nan" else next(k for k in state if k.endswith("running_var"))
    state[key][0] = float("nan") if damage == "nan" else -1.0
    torch.save(state, tmp_path / "bad.pt")
    needle = "holds nan/inf values" if damage == "nan" else "holds a negative variance"
    assert_user_error(cli("pull", "--from-file", tmp_path / "bad.pt", "--arch", SMALL_CNN, "--dataset",
                          "fashion-mnist", "-w", tmp_path), "unusable", key, needle)
    assert Workspace(tmp_path).current_model() is None


def test_pull_refuses_a_zoo_checkpoint_with_nan_weights(cli, tmp_path):
    rn18 = build_architecture(RN18_ENTRY, "cifar10")
    state = rn18.state_dict()
    state["linear.bias"][3] = float("inf")
    path = Workspace(tmp_path).model_path("cifar10", "Linf", RN18_ENTRY)
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    assert_user_error(cli("pull", RN18_ENTRY, "-w", tmp_path), "unusable", "linear.bias holds nan/inf values")
    assert Workspace(tmp_path).current_model() is None


def test_pull_from_file_arch_not_importable(cli, tmp_path, small_ckpt):
    path, _ = small_ckpt
    assert_user_error(cli("pull", "--from-file", path, "--arch", "nonexistent_pkg.nets:Net", "--dataset", "cifar10",
                          "-w", tmp_path), "cannot import module 'nonexistent_pkg.nets'")
    assert_user_error(cli("pull", "--from-file", path, "--dataset", "cifar10", "-w", tmp_path), "needs --arch")
