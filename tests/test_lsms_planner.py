"""LSMS-aware planning: valid nnU-Net plans sized for LSMS, data reuse, presets, and an honest memory estimate."""
import json
import sys
from copy import deepcopy
from multiprocessing.pool import ThreadPool
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from nnunetv2.experiment_planning.dataset_fingerprint import fingerprint_extractor
from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import \
    nnUNetPlannerResEncM
from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset, plan_experiment_dataset
from nnunetv2.preprocessing.preprocessors import default_preprocessor
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from lsms_nnunet.datasets.synthetic import make_synthetic_dataset
from lsms_nnunet.network import LSMSConfig
from lsms_nnunet.planning.data_sharing import share_preprocessed_data
from lsms_nnunet.planning.lsms_block import build_planned_lsms_network, lsms_settings_from_plans
from lsms_nnunet.planning.memory_profile import measure_training_step_peak_bytes
from lsms_nnunet.planning.plan_experiment import (LSMSPlanningError, estimate_training_memory_gb,
                                                  plan_experiment_entry, plan_lsms_experiment)
from lsms_nnunet.planning.planners import (DEFAULT_PLANS_NAME, PRESET_PLANNERS, LSMSExperimentPlanner,
                                           LSMSPlannerResEncM, LSMSResEncPlanner)
from lsms_nnunet.planning.presets import PLAIN_UNET_REFERENCE, PRESETS

DATASET_2D, DATASET_3D, DATASET_NO_FINGERPRINT = 971, 972, 973
# CPU float32 peak of one training step / the planner's estimate (count x nnU-Net's GPU bytes per counted element):
# measured 1.15-1.5 for LSMS on PlainConvUNet plans (nnU-Net's own U-Net estimate: 1.15-1.5 too), so the test allows
# a factor 1.5 either way. The estimate targets a GPU with AMP; CPU float32 activations are larger.
ESTIMATE_TOLERANCE = 1.5


@pytest.fixture(scope="module")
def nnunet_env(tmp_path_factory):
    """Own nnU-Net folders for this module; nnunetv2 2.8 reads the path variables at use time."""
    root = tmp_path_factory.mktemp("lsms_planning")
    patch = pytest.MonkeyPatch()
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (root / name).mkdir()
        patch.setenv(name, str(root / name))
    patch.setenv("nnUNet_def_n_proc", "1")
    patch.setenv("nnUNet_n_proc_DA", "1")  # 0 crashes nnU-Net's own planner
    yield root
    patch.undo()


@pytest.fixture(scope="module")
def nnunet_workers_in_threads():
    """nnU-Net's fingerprint and preprocessing workers in threads: each spawned pool costs seconds on 2 cores."""
    patch = pytest.MonkeyPatch()
    in_threads = SimpleNamespace(get_context=lambda method: SimpleNamespace(Pool=ThreadPool))
    for module in (fingerprint_extractor, default_preprocessor):
        patch.setattr(module, "multiprocessing", in_threads)
    yield
    patch.undo()


@pytest.fixture(scope="module")
def datasets(nnunet_env, nnunet_workers_in_threads):
    """A 2D and a 3D synthetic dataset with nnU-Net's fingerprint, and a 3D one without it."""
    class FewIntensitySamples(DatasetFingerprintExtractor):
        """nnU-Net samples 10^8 foreground intensities (seconds of sorting); planning needs no precise statistics."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.num_foreground_voxels_for_intensitystats = 30_000

    for dataset_id, dim in ((DATASET_2D, 2), (DATASET_3D, 3), (DATASET_NO_FINGERPRINT, 3)):
        make_synthetic_dataset(dataset_id, dim=dim, num_cases=3, num_test_cases=0, name=f"PlanTest{dataset_id}",
                               shape=(48, 48) if dim == 2 else (24, 48, 48))
    for dataset_id in (DATASET_2D, DATASET_3D):
        extract_fingerprint_dataset(dataset_id, FewIntensitySamples, num_processes=1, verbose=False,
                                    show_progress_bar=False)
    return {DATASET_2D: nnunet_env / "nnUNet_preprocessed" / f"Dataset{DATASET_2D}_PlanTest{DATASET_2D}",
            DATASET_3D: nnunet_env / "nnUNet_preprocessed" / f"Dataset{DATASET_3D}_PlanTest{DATASET_3D}"}


def _run_cli(monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", ["LSMSv2_plan_experiment", *args])
    plan_experiment_entry()


def _nnunet_plans(dataset_id: int, planner_class: type = ExperimentPlanner) -> dict:
    plans, _ = plan_experiment_dataset(dataset_id, planner_class)
    return plans


def _assert_valid_lsms_plans(plans_file: Path, dim: int, forward: bool = True) -> None:
    """nnU-Net loads the plans and builds the planned architecture; LSMS builds from them and runs the patch."""
    manager = PlansManager(str(plans_file))
    configurations = [name for name in manager.available_configurations if name.startswith(f"{dim}d")]
    assert configurations, f"no {dim}d configuration in {plans_file}"
    for name in configurations:
        configuration = manager.get_configuration(name)
        assert configuration.preprocessor_name == "DefaultPreprocessor"
        get_network_from_plans(configuration.network_arch_class_name, configuration.network_arch_init_kwargs,
                               configuration.network_arch_init_kwargs_req_import, 1, 2, allow_init=False)
        lsms = build_planned_lsms_network(configuration.configuration["architecture"], 1,
                                          lsms_settings_from_plans(manager.plans, name), deep_supervision=False)
        if not forward:
            continue
        lsms.eval()
        patch = configuration.patch_size
        with torch.no_grad():
            output = lsms(torch.randn(1, 1, *patch), torch.randn(1, 32, 384), torch.ones(1, 32, dtype=torch.bool))
        assert output.shape == (1, 2, *patch)


def test_planning_needs_the_fingerprint(datasets, monkeypatch, capsys):
    with pytest.raises(LSMSPlanningError, match="nnUNetv2_extract_fingerprint -d 973"):
        plan_lsms_experiment(DATASET_NO_FINGERPRINT)
    with pytest.raises(SystemExit) as exit_info:
        _run_cli(monkeypatch, "-d", str(DATASET_NO_FINGERPRINT))
    assert exit_info.value.code == 1
    assert "dataset_fingerprint.json is missing" in capsys.readouterr().err
    with pytest.raises(LSMSPlanningError, match="Dataset 974 is in neither"):
        plan_lsms_experiment(974)


def test_2d_plans_preprocess_only_what_is_missing_then_reuse_nnunet_data(datasets, monkeypatch, capsys):
    folder = datasets[DATASET_2D]
    _run_cli(monkeypatch, "-d", str(DATASET_2D), "-c", "2d", "-np", "1")
    plans = json.loads((folder / f"{DEFAULT_PLANS_NAME}.json").read_text(encoding="utf-8"))
    assert plans["plans_name"] == DEFAULT_PLANS_NAME
    assert plans["experiment_planner_used"] == "LSMSExperimentPlanner"
    assert plans["configurations"]["2d"]["data_identifier"] == f"{DEFAULT_PLANS_NAME}_2d"  # no nnUNetPlans yet
    assert "(preprocessed now)" in capsys.readouterr().out
    assert len(list((folder / f"{DEFAULT_PLANS_NAME}_2d").glob("*.pkl"))) == 3
    _assert_valid_lsms_plans(folder / f"{DEFAULT_PLANS_NAME}.json", dim=2)

    result = plan_lsms_experiment(DATASET_2D, preprocess_configurations=["2d"], num_processes=1)
    assert result.preprocessed_now == [] and result.already_preprocessed == ["2d"]

    nnunet_plans = _nnunet_plans(DATASET_2D)
    result = plan_lsms_experiment(DATASET_2D, preprocess_configurations=())
    lsms_2d, nnunet_2d = result.plans["configurations"]["2d"], nnunet_plans["configurations"]["2d"]
    assert lsms_2d["data_identifier"] == "nnUNetPlans_2d"
    assert lsms_2d["spacing"] == nnunet_2d["spacing"]
    assert (np.prod(lsms_2d["patch_size"]) * lsms_2d["batch_size"]
            <= np.prod(nnunet_2d["patch_size"]) * nnunet_2d["batch_size"])


@pytest.fixture(scope="module")
def plans_3d(datasets) -> dict:
    """nnU-Net's default plans and, with the CLI, the LSMS plans of the 3D dataset (same 8 GB target)."""
    nnunet_plans = _nnunet_plans(DATASET_3D)
    monkeypatch = pytest.MonkeyPatch()
    _run_cli(monkeypatch, "-d", str(DATASET_3D), "--no_pp")
    monkeypatch.undo()
    return {"nnUNetPlans": nnunet_plans,
            DEFAULT_PLANS_NAME: json.loads((datasets[DATASET_3D] / f"{DEFAULT_PLANS_NAME}.json").read_text(encoding="utf-8"))}


def test_3d_plans_are_valid_share_nnunet_data_and_ask_no_more_than_nnunet(datasets, plans_3d):
    lsms_3d = plans_3d[DEFAULT_PLANS_NAME]["configurations"]["3d_fullres"]
    nnunet_3d = plans_3d["nnUNetPlans"]["configurations"]["3d_fullres"]
    assert lsms_3d["data_identifier"] == nnunet_3d["data_identifier"] == "nnUNetPlans_3d_fullres"
    assert (np.prod(lsms_3d["patch_size"]) * lsms_3d["batch_size"]
            <= np.prod(nnunet_3d["patch_size"]) * nnunet_3d["batch_size"])
    _assert_valid_lsms_plans(datasets[DATASET_3D] / f"{DEFAULT_PLANS_NAME}.json", dim=3)


def test_3d_patch_shrinks_to_fit_the_target(datasets):
    """A target small enough to enter nnU-Net's patch-shrinking loop for this tiny dataset; LSMS's own feature maps
    (SVLA, full-scale fusion, contrastive embedding) are counted in the estimate it must fit."""
    target = 0.05
    unlimited = plan_lsms_experiment(DATASET_3D, plans_name="LSMSPlansUnlimited", preprocess_configurations=())
    result = plan_lsms_experiment(DATASET_3D, gpu_memory_target_in_gb=target, plans_name="LSMSPlansSmallGPU",
                                  preprocess_configurations=())
    lsms_3d = result.plans["configurations"]["3d_fullres"]
    assert np.prod(lsms_3d["patch_size"]) < np.prod(unlimited.plans["configurations"]["3d_fullres"]["patch_size"])
    assert lsms_3d["batch_size"] == 2  # nnU-Net's minimum once the patch had to shrink
    memory = estimate_training_memory_gb(result.plans, "3d_fullres", 1, LSMSExperimentPlanner.planning_reference())
    assert memory <= target


def test_resenc_preset_m_plans_less_than_nnunet_resenc_m(datasets, monkeypatch):
    _run_cli(monkeypatch, "-d", str(DATASET_3D), "-preset", "M", "--no_pp")
    plans_file = datasets[DATASET_3D] / f"{PRESETS['M'].plans_name}.json"
    plans = json.loads(plans_file.read_text(encoding="utf-8"))
    assert plans["experiment_planner_used"] == LSMSPlannerResEncM.__name__
    nnunet_m = _nnunet_plans(DATASET_3D, nnUNetPlannerResEncM)
    lsms_3d, nnunet_3d = plans["configurations"]["3d_fullres"], nnunet_m["configurations"]["3d_fullres"]
    assert lsms_3d["architecture"]["network_class_name"].endswith("ResidualEncoderUNet")
    assert (np.prod(lsms_3d["patch_size"]) * lsms_3d["batch_size"]
            <= np.prod(nnunet_3d["patch_size"]) * nnunet_3d["batch_size"])
    _assert_valid_lsms_plans(plans_file, dim=3, forward=False)  # 3D residual blocks are slow on CPU


@pytest.mark.parametrize("planner_class, plans_name, target", [
    (LSMSResEncPlanner, "nnUNetLSMSPlans_ResEnc", 8), (PRESET_PLANNERS["L"], "nnUNetLSMSPlans_L", 24),
    (PRESET_PLANNERS["XL"], "nnUNetLSMSPlans_XL", 40)])
def test_presets_set_target_reference_and_plans_name(datasets, planner_class, plans_name, target):
    planner = planner_class(DATASET_3D)
    assert planner.plans_identifier == plans_name and planner.UNet_vram_target_GB == target
    reference = planner_class.planning_reference()
    assert planner.UNet_reference_val_3d == reference.elements_3d > planner_class.base_reference.elements_3d
    assert planner.UNet_reference_val_2d == reference.elements_2d > planner_class.base_reference.elements_2d
    assert planner.UNet_reference_val_corresp_GB == target
    assert planner.max_dataset_covered == (1 if planner_class.preset else 0.05)  # like nnU-Net's presets


def test_gpu_memory_target_overrides_the_preset(datasets):
    assert PRESET_PLANNERS["M"](DATASET_3D, gpu_memory_target_in_gb=12).UNet_vram_target_GB == 12


def test_lsms_block_round_trips_through_lsms_config(plans_3d):
    plans = plans_3d[DEFAULT_PLANS_NAME]
    for name, configuration in plans["configurations"].items():
        if "inherits_from" in configuration:  # 3d_cascade_fullres inherits its parent's block
            assert lsms_settings_from_plans(plans, name) == lsms_settings_from_plans(plans,
                                                                                      configuration["inherits_from"])
            continue
        settings = lsms_settings_from_plans(plans, name)
        n_stages = configuration["architecture"]["arch_kwargs"]["n_stages"]
        assert set(settings) == {"text_dim", "max_tokens", "svla_stages", "fsd_channels_per_scale", "attention_dim"}
        config = LSMSConfig.from_dict(settings)
        assert config.svla_stage_indices(n_stages) == tuple(range(2, n_stages))  # stride 4 and deeper
        assert {key: config.to_dict()[key] for key in settings} == configuration["lsms"]
        assert configuration["lsms"]["text_dim"] == 384 and configuration["lsms"]["max_tokens"] == 32
    assert lsms_settings_from_plans(plans_3d["nnUNetPlans"], "3d_fullres") == {}

    broken = deepcopy(plans)
    broken["configurations"]["3d_fullres"]["lsms"]["text_dimension"] = 384
    with pytest.raises(ValueError, match="nnUNetLSMSPlans.*'3d_fullres'.*text_dimension"):
        lsms_settings_from_plans(broken, "3d_fullres")
    with pytest.raises(ValueError, match="'3d_midres' is not in plans 'nnUNetLSMSPlans'"):
        lsms_settings_from_plans(plans, "3d_midres")


def test_data_are_shared_only_when_preprocessing_is_identical():
    common = {"preprocessor_name": "DefaultPreprocessor", "normalization_schemes": ["CTNormalization"],
              "use_mask_for_norm": [False], "resampling_fn_data": "resample_data_or_seg_to_shape",
              "resampling_fn_data_kwargs": {"order": 3}, "resampling_fn_seg": "resample_data_or_seg_to_shape",
              "resampling_fn_seg_kwargs": {"order": 1},
              "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet"}}
    top = {"transpose_forward": [0, 1, 2], "image_reader_writer": "SimpleITKIO",
           "foreground_intensity_properties_per_channel": {"0": {"mean": 1.0}}}
    nnunet = {**top, "plans_name": "nnUNetPlans", "configurations": {
        "3d_fullres": {**common, "spacing": [2.0, 1.0, 1.0], "data_identifier": "nnUNetPlans_3d_fullres"},
        "3d_lowres": {**common, "spacing": [4.0, 2.0, 2.0], "data_identifier": "nnUNetPlans_3d_lowres"}}}
    lsms = {**top, "plans_name": "nnUNetLSMSPlans", "configurations": {
        "3d_fullres": {**common, "spacing": [2.0, 1.0, 1.0], "data_identifier": "nnUNetLSMSPlans_3d_fullres"},
        "3d_lowres": {**common, "spacing": [3.0, 1.5, 1.5], "data_identifier": "nnUNetLSMSPlans_3d_lowres"},
        "3d_cascade_fullres": {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}}}
    assert share_preprocessed_data(lsms, nnunet) == {"3d_fullres": "nnUNetPlans_3d_fullres"}
    assert lsms["configurations"]["3d_lowres"]["data_identifier"] == "nnUNetLSMSPlans_3d_lowres"

    other_normalization = json.loads(json.dumps(lsms))
    other_normalization["configurations"]["3d_fullres"].update(normalization_schemes=["ZScoreNormalization"],
                                                               data_identifier="nnUNetLSMSPlans_3d_fullres")
    assert share_preprocessed_data(other_normalization, nnunet) == {}
    other_transpose = {**json.loads(json.dumps(lsms)), "transpose_forward": [2, 0, 1]}
    assert share_preprocessed_data(other_transpose, nnunet) == {}


def test_peak_memory_measurement_sees_torch_allocations():
    network = torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.LeakyReLU())
    activation_bytes = 2 * 8 * 16 ** 3 * 4
    peak_2 = measure_training_step_peak_bytes(network, (16, 16, 16), 2)
    peak_4 = measure_training_step_peak_bytes(network, (16, 16, 16), 4)
    assert activation_bytes <= peak_2 < 6 * activation_bytes
    assert 1.7 < peak_4 / peak_2 < 2.3  # activations dominate: twice the batch, about twice the memory
    with pytest.raises(ValueError, match="batch_size and patch_size must be positive"):
        measure_training_step_peak_bytes(network, (16, 16, 16), 0)


def test_estimate_matches_measured_peak_within_tolerance():
    """The planner's byte estimate for LSMS vs the measured CPU peak, next to nnU-Net's own estimate for its U-Net."""
    architecture = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {"n_stages": 6, "features_per_stage": [16, 32, 64, 128, 128, 128],
                        "conv_op": "torch.nn.Conv2d", "kernel_sizes": [[3, 3]] * 6, "strides": [[1, 1]] + [[2, 2]] * 5,
                        "n_conv_per_stage": [2] * 6, "n_conv_per_stage_decoder": [2] * 5, "conv_bias": True,
                        "norm_op": "torch.nn.InstanceNorm2d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
                        "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                        "nonlin_kwargs": {"inplace": True}},
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    # Half nnU-Net's widths, capped at 128, keep this fast; activations still dominate (with 512 features and tiny
    # patches the parameter gradients, which neither count includes, would).
    patch, batch = (128, 128), 2
    lsms = build_planned_lsms_network(architecture, 1, {})
    lsms_estimate = (float(lsms.compute_conv_feature_map_size(patch)) * batch
                     * LSMSExperimentPlanner.planning_reference().bytes_per_element(2))
    lsms_ratio = measure_training_step_peak_bytes(lsms, patch, batch) / lsms_estimate
    assert 1 / ESTIMATE_TOLERANCE <= lsms_ratio <= ESTIMATE_TOLERANCE

    unet = get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                  architecture["_kw_requires_import"], 1, 2, deep_supervision=True)
    unet_estimate = float(unet.compute_conv_feature_map_size(patch)) * batch * PLAIN_UNET_REFERENCE.bytes_per_element(2)
    unet_ratio = measure_training_step_peak_bytes(unet, patch, batch) / unet_estimate
    # LSMS's estimate errs like nnU-Net's own: the calibration puts both counts on nnU-Net's scale.
    assert 0.75 <= lsms_ratio / unet_ratio <= 1.33


def test_planning_processes_are_capped_at_the_cpu_count_unless_the_user_names_them():
    from lsms_nnunet.preprocessing.encode_text import processes_for_this_machine

    assert processes_for_this_machine([], cpus=2) == ["-npfp", "2", "-np", "2", "2", "2"]
    assert processes_for_this_machine(["-c", "2d", "3d_fullres"], cpus=6) == ["-npfp", "6", "-np", "6", "4"]
    assert processes_for_this_machine(["-c", "2d", "-np", "3"], cpus=64) == ["-npfp", "8"]
    assert processes_for_this_machine(["-npfp", "1", "-c", "3d_fullres"], cpus=64) == ["-np", "4"]
