"""The version-guarded shim through which the stock nnUNetv2_predict becomes text-aware (end to end: the stock predict
tests of test_end_to_end_referring.py and test_end_to_end_plain.py)."""
import pytest

from lsms_nnunet.inference.nnunet_shim import UnsupportedNnUNetError, check_nnunet_version, stock_loader_locals


def test_installed_nnunet_is_a_checked_version():
    check_nnunet_version()


@pytest.mark.parametrize("other", ["2.9.0", "2.7.3", "3.0"])
def test_other_nnunet_versions_are_refused_with_the_fix(other):
    with pytest.raises(UnsupportedNnUNetError, match=rf"not {other}\. Fix: pip install 'nnunetv2>=2.8,<2.9'"):
        check_nnunet_version(other)


def test_only_nnunets_checkpoint_loader_is_recognised_as_the_caller():
    def build():  # what build_network_architecture sees when a trainer calls it
        return stock_loader_locals()

    def initialize_from_trained_model_folder():  # nnU-Net's loader, by name
        model_training_output_dir = "folder"  # noqa: F841 (read through the frame)
        return build()

    assert build() is None
    assert initialize_from_trained_model_folder()["model_training_output_dir"] == "folder"
