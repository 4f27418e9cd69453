"""3D parallelism for the DeepSeek-V3 model: mesh, expert parallel, ZeRO-1, pipeline stages.

Applied from outside the single-device model, in the order of `executor.ParallelExecutor`
(see docs/parallel.md). Nothing here keeps module-level state: the mesh is an explicit object.
"""

from megads.parallel.config import ParallelConfig
from megads.parallel.mesh import LayoutPlan, ParallelMesh, plan_layout

__all__ = ["LayoutPlan", "ParallelConfig", "ParallelMesh", "plan_layout"]
