"""Aux sets: the fixed, label-free inputs velocity is measured on (torch only).

* ``builders`` - :func:`~neve_tune.noise_aux`, :func:`~neve_tune.subset_aux`, :func:`~neve_tune.image_folder_aux`;
* ``tokens`` - :func:`~neve_tune.token_aux`, :func:`~neve_tune.token_subset_aux` for token models.
"""
