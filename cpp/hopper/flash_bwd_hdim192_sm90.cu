// fa3_jax Hopper backward instantiations for head dim 192 (head_dim_v 192 and 128).
#include "flash_bwd_launch_template_sm90.h"

#if FA3_BWD_HDIM192
FA3_BWD_INSTANTIATE(192, 192)
FA3_BWD_INSTANTIATE(192, 128)
#endif
