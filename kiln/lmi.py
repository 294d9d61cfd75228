"""The SageMaker LMI container (DJL Serving with vLLM) that `serving.engine: lmi` deploys: the
pinned image per region and the container environment for a model directory at /opt/ml/model.

Sources:
- Image and version: LMI release notes (djl-serving `serving/docs/lmi/release_notes.md`, "LMI
  V20 (DJL-Serving 0.36.0)": `763104351884.dkr.ecr.us-west-2.amazonaws.com/djl-inference:
  0.36.0-lmi20.0.0-cu128-v1.0`, vLLM 0.15.1). The `-v1.0` tag names one patch release; the
  tag without it moves when AWS republishes the image.
- Registry account per region: AWS Deep Learning Containers, "Region Availability"
  (aws/deep-learning-containers `docs/reference/region_availability.md`), the accounts the
  SageMaker Python SDK's `image_uri_config/djl-lmi.json` also lists. China's partition
  (amazonaws.com.cn) is left out: kiln's settings do not take its regions.
- Environment: LMI's configuration guide (`OPTION_<x>` for `option.<x>`, `SERVING_<x>` for
  server settings) and vLLM user guide: since LMI V17 the vLLM handler runs in async mode
  (`option.async_mode`, `option.rolling_batch=disable`, entry point
  `djl_python.lmi_vllm.vllm_async_service`), which "will become the default, and only supported
  mode"; `option.rolling_batch=vllm` selects the older rolling-batch handler instead.
  "If you use [ModelDataSource] ... you do not need to specify option.model_id or HF_MODEL_ID":
  LMI reads /opt/ml/model; HF_MODEL_ID names it anyway, so nothing is fetched from elsewhere.
  `option.model_loading_timeout` defaults to 1800 s: "if you set this value, you should also set
  container_startup_health_check_timeout=<at least model loading timeout>".
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

LMI_VERSION = "0.36.0-lmi20.0.0-cu128-v1.0"
LMI_REPOSITORY = "djl-inference"
# Where SageMaker places the model data (a tarball unpacked, or an S3 prefix's objects).
MODEL_DIR = "/opt/ml/model"
ENTRY_POINT = "djl_python.lmi_vllm.vllm_async_service"

_DLC = "763104351884"
# Deep Learning Containers registry account per region.
REGISTRIES: Mapping[str, str] = MappingProxyType(
    {
        "us-east-1": _DLC,
        "us-east-2": _DLC,
        "us-west-1": _DLC,
        "us-west-2": _DLC,
        "af-south-1": "626614931356",
        "ap-east-1": "871362719292",
        "ap-south-1": _DLC,
        "ap-south-2": "772153158452",
        "ap-southeast-1": _DLC,
        "ap-southeast-2": _DLC,
        "ap-southeast-3": "907027046896",
        "ap-southeast-4": "457447274322",
        "ap-northeast-1": _DLC,
        "ap-northeast-2": _DLC,
        "ap-northeast-3": "364406365360",
        "ca-central-1": _DLC,
        "ca-west-1": "204538143572",
        "eu-central-1": _DLC,
        "eu-central-2": "380420809688",
        "eu-north-1": _DLC,
        "eu-south-1": "692866216735",
        "eu-south-2": "503227376785",
        "eu-west-1": _DLC,
        "eu-west-2": _DLC,
        "eu-west-3": _DLC,
        "il-central-1": "780543022126",
        "me-central-1": "914824155844",
        "me-south-1": "217643126080",
        "sa-east-1": _DLC,
    }
)


class LmiEnv:
    """The LMI container variables kiln sets (LMI's configuration guide)."""

    MODEL_ID = "HF_MODEL_ID"
    ASYNC_MODE = "OPTION_ASYNC_MODE"
    ROLLING_BATCH = "OPTION_ROLLING_BATCH"
    ENTRY_POINT = "OPTION_ENTRYPOINT"
    TENSOR_PARALLEL_DEGREE = "OPTION_TENSOR_PARALLEL_DEGREE"
    MAX_MODEL_LEN = "OPTION_MAX_MODEL_LEN"
    MODEL_LOADING_TIMEOUT = "OPTION_MODEL_LOADING_TIMEOUT"
    FAIL_FAST = "SERVING_FAIL_FAST"


def region_problem(region: str) -> str | None:
    """Why the LMI image cannot be pulled in `region`, or None."""
    if region in REGISTRIES:
        return None
    return (
        f"kiln has no record of the LMI image's registry in {region}; check AWS Deep Learning "
        "Containers, Region Availability, and add the region to REGISTRIES in kiln/lmi.py; "
        f"recorded regions: {', '.join(sorted(REGISTRIES))}"
    )


def image_uri(region: str, *, url_suffix: str = "amazonaws.com") -> str:
    """The pinned LMI image in `region`'s Deep Learning Containers registry."""
    problem = region_problem(region)
    if problem is not None:
        raise ValueError(problem)
    return f"{REGISTRIES[region]}.dkr.ecr.{region}.{url_suffix}/{LMI_REPOSITORY}:{LMI_VERSION}"


def repository_arn(region: str, partition: str) -> str:
    """The ARN of the LMI image's repository, which the execution role may pull from."""
    return f"arn:{partition}:ecr:{region}:{REGISTRIES[region]}:repository/{LMI_REPOSITORY}"


def environment(
    *,
    tensor_parallel_degree: int,
    max_model_len: int | None,
    model_loading_timeout_seconds: int,
) -> dict[str, str]:
    """The container variables: vLLM in async mode over the model at /opt/ml/model, sharded
    over `tensor_parallel_degree` GPUs, failing fast (the health check then fails and the
    deployment rolls back) instead of serving from a broken engine."""
    env = {
        LmiEnv.MODEL_ID: MODEL_DIR,
        LmiEnv.ASYNC_MODE: "true",
        LmiEnv.ROLLING_BATCH: "disable",
        LmiEnv.ENTRY_POINT: ENTRY_POINT,
        LmiEnv.TENSOR_PARALLEL_DEGREE: str(tensor_parallel_degree),
        LmiEnv.MODEL_LOADING_TIMEOUT: str(model_loading_timeout_seconds),
        LmiEnv.FAIL_FAST: "true",
    }
    if max_model_len is not None:
        env[LmiEnv.MAX_MODEL_LEN] = str(max_model_len)
    return env
