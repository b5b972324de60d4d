"""The Attune platform's own rows, as a sensor worker reads them: which sensors it wants run
(sensors.py), the rules it places them by (rules.py), and the sync pass that keeps
attune-sensor's assignments equal to them (sync.py). docs/design.md, "The platform's sensors".
"""
