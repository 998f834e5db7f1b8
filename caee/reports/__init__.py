"""Tables of the reproduction drivers: supplementary Table I and the masking-depth sweep (Fig. II)."""
