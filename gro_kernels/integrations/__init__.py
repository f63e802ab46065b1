"""Drop-ins for existing trainers. Each submodule imports its trainer library, so import the one you use:

    from gro_kernels.integrations.trl import GROGRPOTrainer, GRODPOTrainer, GROKTOTrainer, patch_trainer
    from gro_kernels.integrations.verl import register

Nothing here is imported by `import gro_kernels`: neither TRL nor verl is a dependency.
"""


def missing_dependency(module: str, error: ImportError, install: str) -> ImportError:
    """The ImportError to raise when a drop-in's trainer library is absent: what is missing and what to install."""
    name = (getattr(error, "name", None) or str(error)).split(".")[0]
    return ImportError(f"{module} needs the package {name!r}, which is not installed ({error}).\n"
                       f"Install it with:  {install}")
