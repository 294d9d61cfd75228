"""Fixtures of the operating-command tests."""

from __future__ import annotations

import pytest

from kiln.contract import Component
from tests.kiln_cli import support
from tests.support import Synthesis


@pytest.fixture(scope="session")
def stack_outputs(synthesis: Synthesis) -> dict[str, dict[Component, dict[str, str]]]:
    """The fake stacks' outputs, derived from the synthesized templates (never written by
    hand), so a renamed or new output reaches these tests by itself."""
    if not support.DEPLOYED:
        support.DEPLOYED.update(support.synthesized_outputs(synthesis.stacks))
    return support.DEPLOYED


@pytest.fixture(autouse=True)
def _moto_keeps_additional_specifications(monkeypatch: pytest.MonkeyPatch) -> None:
    """moto 5.2.5's UpdateModelPackage sets a version's AdditionalInferenceSpecifications to
    AdditionalInferenceSpecificationsToAdd even when that is absent, so an approval would wipe
    them; the API adds the given ones and leaves the rest ("to be added to the existing array",
    SageMaker API Reference, UpdateModelPackage). Patched to the API's behaviour."""
    from moto.sagemaker.models import ModelPackage

    add = ModelPackage.add_additional_inference_specifications

    def add_if_given(self: ModelPackage, to_add: list[object] | None) -> None:
        if to_add is not None:
            add(self, to_add)

    monkeypatch.setattr(ModelPackage, "add_additional_inference_specifications", add_if_given)
