"""The old name of `esd.selection` (which UNet parameters each ESD method trains): import from there.

Only a re-export, kept while `esd.erase` still imports `select_parameters` from here.
"""

from esd.selection import GROUPS, RULES, group_table, module_group, select_parameters, trainable_names

__all__ = ["GROUPS", "RULES", "group_table", "module_group", "select_parameters", "trainable_names"]
