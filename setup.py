from setuptools import find_packages, setup

setup(
    name="fwconvert",
    version="0.1.0",
    description="Give pretrained LLaMA-family models fast weights (FWL heads, in-place TTT), calibrate, export to ONNX, verify.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["fwconvert", "fwconvert.*", "exporters", "exporters.*"]),
    install_requires=[
        "torch>=2.6",
        "safetensors>=0.4",
        "onnx>=1.21",
        "onnxruntime-gpu>=1.31",
        "onnxscript>=0.7.2,<0.8",  # torch's dynamo ONNX exporter and the ORT fusions (exporters/onnx/graph.py)
        "transformers>=4.56",
        "click>=8.1",
        "numpy>=1.24",  # onnxruntime IO and state buffers
        "tqdm>=4.60",  # progress bars on long work
        "gguf>=0.10",  # reading GGUF checkpoints (SmolLM2 ships as GGUF)
        "matplotlib>=3.5",  # eval --plot
    ],
    extras_require={"test": ["pytest>=7", "pytest-timeout>=2", "hypothesis>=6"]},
    entry_points={"console_scripts": ["fwconvert=fwconvert.cli.main:main"]},
)
