"""One environment's stacks, composed and wired: the unit `app.py` builds per environment."""

from __future__ import annotations

from aws_cdk import Aspects, Environment, Stage, Tags
from constructs import Construct

from kiln import naming
from kiln.contract import Component
from kiln.settings import Settings
from platform_constructs.aspects import LogGroupRetention
from stacks.compute import ComputeStack
from stacks.data_lake import DataLakeStack
from stacks.models import ModelsStack
from stacks.network import NetworkStack
from stacks.observability import ObservabilityStack, Watched
from stacks.serving import ServingStack
from stacks.streaming import StreamingStack
from stacks.warehouse import WarehouseStack


class KilnStage(Stage):
    """Every stack of one environment. Attributes: `settings`, `network`, `data_lake`,
    `streaming`, `warehouse`, `compute`, `observability`, `models`, `serving`."""

    def __init__(self, scope: Construct, *, settings: Settings) -> None:
        super().__init__(
            scope,
            settings.name,
            env=Environment(account=settings.account, region=settings.region),
        )
        self.settings = settings
        self.network = NetworkStack(self, Component.NETWORK.construct_id, settings=settings)
        self.data_lake = DataLakeStack(self, Component.DATA_LAKE.construct_id, settings=settings)
        self.streaming = StreamingStack(
            self,
            Component.STREAMING.construct_id,
            settings=settings,
            vpc=self.network.vpc,
            log_key=self.network.log_key,
            lake_key=self.data_lake.key,
            s3_prefix_list_id=self.network.s3_prefix_list_id,
        )
        self.warehouse = WarehouseStack(
            self,
            Component.WAREHOUSE.construct_id,
            settings=settings,
            vpc=self.network.vpc,
            log_key=self.network.log_key,
            lake_key=self.data_lake.key,
            msk=self.streaming.msk,
            s3_prefix_list_id=self.network.s3_prefix_list_id,
        )
        self.compute = ComputeStack(
            self,
            Component.COMPUTE.construct_id,
            settings=settings,
            vpc=self.network.vpc,
            log_key=self.network.log_key,
            lake_key=self.data_lake.key,
            s3_prefix_list_id=self.network.s3_prefix_list_id,
        )
        self.observability = ObservabilityStack(
            self,
            Component.OBSERVABILITY.construct_id,
            settings=settings,
            watched=Watched.of(
                delivery=self.streaming.delivery,
                msk=self.streaming.msk,
                warehouse=self.warehouse.warehouse,
                gpu=self.compute.gpu_cluster,
            ),
        )
        self.models = ModelsStack(
            self,
            Component.MODELS.construct_id,
            settings=settings,
            # Training on EKS and on SageMaker registers its finished runs.
            trainer_roles=[self.compute.trainer_role, self.compute.sagemaker_training_role],
        )
        self.serving = ServingStack(
            self,
            Component.SERVING.construct_id,
            settings=settings,
            vpc=self.network.vpc,
            lake_key=self.data_lake.key,
            msk=self.streaming.msk,
            rollback_alarm_names=self.observability.rollback_alarms.names,
            s3_prefix_list_id=self.network.s3_prefix_list_id,
        )
        if self.models.images is not None:
            # The serving stack publishes its image to the models stack's repository: the CDK
            # publishes a stack's assets after the stacks it depends on are deployed.
            self.serving.add_stack_dependency(self.models)
        # The endpoint's deployment names the rollback alarms by their derived names (no
        # cross-stack reference carries the order), and they must exist first.
        self.serving.add_stack_dependency(self.observability)
        # These address lake buckets by name, so the order is declared rather than implied.
        for stack in (self.streaming, self.warehouse, self.compute, self.serving):
            stack.add_stack_dependency(self.data_lake)

        for key, value in naming.standard_tags(settings).items():
            Tags.of(self).add(key, value)
        Aspects.of(self).add(LogGroupRetention(settings.log_retention_days))
