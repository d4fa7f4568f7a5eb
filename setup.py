from setuptools import setup

# lowering/ and templates/ live at the top of the repo (the design's layout) but ship
# inside the inductor_flex namespace so no generic module names land in site-packages.
setup(
    name="inductor-flex",
    version="0.1.0",
    description="FlexAttention as a torch.compile / Inductor plugin: fused Triton kernels from score_mod/mask_mod",
    python_requires=">=3.10",
    packages=["inductor_flex", "inductor_flex.lowering", "inductor_flex.templates"],
    package_dir={
        "inductor_flex": "inductor_flex",
        "inductor_flex.lowering": "lowering",
        "inductor_flex.templates": "templates",
    },
    package_data={"inductor_flex.templates": ["*.jinja"]},
    install_requires=["torch>=2.11", "triton>=3.6", "jinja2", "sympy"],
    extras_require={"test": ["pytest", "hypothesis", "numpy"]},
    entry_points={
        "torch_dynamo_backends": ["inductor_flex = inductor_flex.backend:inductor_flex_backend"],
    },
)
