"""Compression of registered models into new, measured versions: a recipe of steps
(``recipe``), each a transform of the model's module tree that the model's code never knows
about (``steps``), run as an ``optimize`` job (``job``) whose result records its parent, its
recipe and a report measured on parent and child in the same run (``report``)."""
