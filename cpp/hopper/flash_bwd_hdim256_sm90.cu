// fa3_jax Hopper backward instantiations for head dim 256.
#include "flash_bwd_launch_template_sm90.h"

#if FA3_BWD_HDIM256
FA3_BWD_INSTANTIATE(256, 256)
#endif
