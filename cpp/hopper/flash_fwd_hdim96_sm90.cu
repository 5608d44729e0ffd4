// fa3_jax Hopper forward instantiations for head dim 96, 16-bit.
#include "flash_fwd_launch_template_sm90.h"

#if FA3_JAX_BUILD_HDIM(96)
FA3_FWD_INSTANTIATE(96, 96)
#endif
