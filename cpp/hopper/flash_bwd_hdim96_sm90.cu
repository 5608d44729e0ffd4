// fa3_jax Hopper backward instantiations for head dim 96.
#include "flash_bwd_launch_template_sm90.h"

#if FA3_BWD_HDIM96
FA3_BWD_INSTANTIATE(96, 96)
#endif
