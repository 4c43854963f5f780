"""Sensitivity, Pareto frontier, exact bit allocation, size and BOPs accounting (HAWQ-V2, steps 2-3)."""

from hawq.alloc.activations import activation_omega, activation_perturbations
from hawq.alloc.baselines import (
    ALLOCATORS,
    eig_bound_plan,
    empirical_fisher,
    fisher_plan,
    hawq_plan,
    monotone_plan,
    random_plan,
    rescored_table,
    reversed_plan,
    score_plan,
    top_eigenvalues,
    uniform_plan,
    v1_plan,
)
from hawq.alloc.frontier import FrontierPoint, ParetoSet, pareto_dp, pareto_frontier
from hawq.alloc.ilp import solve_ilp
from hawq.alloc.joint import best_joint_plan, joint_frontier, weight_frontier
from hawq.alloc.plan import Plan, best_plan, make_plan, plan_for_bits, plan_from_point, plan_omega
from hawq.alloc.sensitivity import (
    LayerSensitivity,
    SensitivityTable,
    default_fixed,
    layer_macs,
    sensitivity_table,
    sizing_table,
)
from hawq.alloc.size import (
    MB,
    fp32_size_bytes,
    min_size_bytes,
    model_size_bits,
    model_size_bytes,
    plan_bops,
    size_report,
)

__all__ = [
    "activation_omega",
    "activation_perturbations",
    "ALLOCATORS",
    "FrontierPoint",
    "LayerSensitivity",
    "MB",
    "ParetoSet",
    "Plan",
    "SensitivityTable",
    "best_joint_plan",
    "best_plan",
    "default_fixed",
    "empirical_fisher",
    "fisher_plan",
    "fp32_size_bytes",
    "hawq_plan",
    "joint_frontier",
    "layer_macs",
    "make_plan",
    "min_size_bytes",
    "model_size_bits",
    "model_size_bytes",
    "monotone_plan",
    "pareto_dp",
    "pareto_frontier",
    "plan_bops",
    "plan_for_bits",
    "plan_from_point",
    "plan_omega",
    "random_plan",
    "rescored_table",
    "reversed_plan",
    "score_plan",
    "sensitivity_table",
    "size_report",
    "sizing_table",
    "solve_ilp",
    "top_eigenvalues",
    "uniform_plan",
    "v1_plan",
    "eig_bound_plan",
    "weight_frontier",
]
