"""Activation offload: the calibrator's per-block activations on disk give the same model."""
import pytest
import torch

import compresskit
from compresskit.calib.capture import is_chained
from compresskit.nn import quantized_of
from compresskit import CompressConfig
from compresskit.calib import offload
from compresskit.calib.offload import ActivationStore, Ref
from compresskit.calib import Calibrator, CalibrationConfig
from compresskit.errors import CompressKitError

from toy_models import Residual


@pytest.mark.parametrize("directory", [False, True])
def test_store_round_trip_overwrite_and_cleanup(tmp_path, directory):
    store = ActivationStore(tmp_path / "acts" if directory else None)
    a, b = torch.randn(3, 4), torch.randn(2, 5)
    ref = store.put("x", a)
    assert ref == Ref("x") and torch.equal(store.get(ref), a) and store.resolve(7) == 7
    store.put("x", b)  # same key: replaced
    assert torch.equal(store.resolve(ref), b)
    folder = store.folder
    if directory:
        assert folder.parent == tmp_path / "acts" and any(folder.iterdir())
    store.close()
    if directory:
        assert not folder.exists()


def test_a_file_is_not_a_directory(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(CompressKitError, match="not a directory"):
        ActivationStore(f)


@pytest.mark.parametrize("objective", [None, "block"])
def test_offloaded_walk_gives_the_same_model_and_leaves_no_files(tmp_path, monkeypatch, objective):
    torch.manual_seed(0)
    base = Residual().eval()
    g = torch.Generator().manual_seed(1)
    batches = [{"x": torch.randn(16, 32, generator=g)} for _ in range(4)]
    written = []
    real_put = ActivationStore.put

    def spy(self, key, tensor):
        written.append((self.folder, key))
        return real_put(self, key, tensor)

    monkeypatch.setattr(offload.ActivationStore, "put", spy)
    codes = {}
    for where in (None, tmp_path / "acts"):
        model = Residual().eval()
        model.load_state_dict(base.state_dict())
        config = CalibrationConfig(local_rounds=1, m_objective=objective, m_steps=3 if objective == "block" else 0, offload_dir=where and str(where))
        cal = Calibrator([f"blocks.{i}" for i in range(3)], batches, config=config)
        assert is_chained(model, cal.blocks, batches[0])
        compresskit.compress(model, CompressConfig(method="pq", bits=2, params={"pool": False, "k": 16}), calibration=cal)
        codes[where is None] = [quantized_of(model.get_submodule(f"blocks.{i}.fc"), "weight").codes.clone() for i in range(3)]
        with torch.no_grad():
            codes[(where is None, "out")] = model(batches[0]["x"])
    assert all(torch.equal(a, b) for a, b in zip(codes[True], codes[False]))
    torch.testing.assert_close(codes[(True, "out")], codes[(False, "out")])
    on_disk = [key for folder, key in written if folder is not None]
    assert on_disk and all(folder.parent == tmp_path / "acts" for folder, _ in written if folder is not None)
    # the original model's block outputs (the asymmetric targets' stream, and the block M-step's teacher)
    assert any(key.startswith("f") for key in on_disk)
    assert list((tmp_path / "acts").iterdir()) == []  # the temporary folder is gone
