"""Deterministic synthetic data: fingers and impressions, people and records, populations on disk.

Public entry points: :func:`synthetic.population.generate_population`,
:func:`~synthetic.population.write_population`, :func:`~synthetic.population.read_population`;
:func:`synthetic.fingers.master_finger` and :func:`~synthetic.fingers.impression` for one finger;
:data:`synthetic.people.OFFENSES`, the NCIC offense catalogue with the level each code should get.
"""
