"""The ProtoSAM Segment Editor effect (thin Qt class; behaviour in ProtoSAMSlicerLib.effect_session)."""
