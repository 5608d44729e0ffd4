// fa3_jax Hopper backward instantiations for head dim 64.
#include "flash_bwd_launch_template_sm90.h"

#if FA3_BWD_HDIM64
FA3_BWD_INSTANTIATE(64, 64)
#endif
