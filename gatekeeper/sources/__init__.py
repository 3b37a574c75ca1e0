"""Turn a model reference into a local folder plus provenance.

The only gatekeeper package that talks to a network (the Hugging Face Hub, through
``huggingface_hub``; an MLflow Model Registry, through the optional ``mlflow`` client).
References: ``hf://org/name[@revision]``, ``models:/name/version``, ``models:/name@alias`` or a
local folder path.
"""

from __future__ import annotations

from gatekeeper.errors import UsageError
from gatekeeper.sources.base import ResolvedModel, hash_folder, parse_reference, validate_revision
from gatekeeper.sources.local import resolve_local

__all__ = ["ResolvedModel", "hash_folder", "parse_reference", "resolve", "resolve_local"]


def resolve(ref: str, *, revision: str | None = None, cache_dir: str | None = None) -> ResolvedModel:
    """Resolve a model reference to a local folder, fetching from the Hub when needed.

    Args:
        ref: ``hf://org/name``, ``hf://org/name@revision``, ``models:/name/version``,
            ``models:/name@alias`` or a local folder path.
        revision: a Hub revision (``--revision``); must agree with one given in ``ref``. For
            MLflow it may only repeat the version or ``@alias`` of ``ref``.
        cache_dir: the Hub cache folder (None: ``HF_HUB_CACHE`` / ``HF_HOME``), or for MLflow
            the download folder (None: ``GATEKEEPER_MLFLOW_CACHE`` / ``~/.cache/gatekeeper/mlflow``).

    Returns:
        The folder and its provenance (per-file sha256, content hash, commit sha for the Hub).

    Raises:
        UsageError: a bad reference, two different revisions, or a revision for a local folder.
        SourceError: the folder or Hub repo/revision cannot be resolved.
    """
    scheme, target, ref_revision = parse_reference(ref)
    if revision is not None:
        validate_revision(revision)
    if scheme == "local":
        if revision is not None:
            raise UsageError(
                f"--revision {revision!r} given for the local folder {target!r}",
                "drop --revision, or use hf://org/name@revision",
            )
        return resolve_local(target, reference=ref)
    if revision is not None and ref_revision is not None and revision != ref_revision:
        raise UsageError(
            f"two revisions given: {ref_revision!r} in {ref!r} and --revision {revision!r}",
            "give the revision once, in the reference or with --revision",
        )
    if scheme == "mlflow":
        from gatekeeper.sources.mlflow_source import resolve_mlflow  # lazy: mlflow is optional and slow

        assert ref_revision is not None  # parse_reference always gives a version or @alias
        return resolve_mlflow(target, ref_revision, cache_dir, reference=ref)
    from gatekeeper.sources.hub import resolve_hub  # lazy: huggingface_hub is slow to import

    return resolve_hub(target, revision or ref_revision, cache_dir, reference=ref)
