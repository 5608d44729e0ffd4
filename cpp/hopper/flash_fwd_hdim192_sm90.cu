// fa3_jax Hopper forward instantiations for head dim 192 (dv 192 and 128), 16-bit.
#include "flash_fwd_launch_template_sm90.h"

#if FA3_JAX_BUILD_HDIM(192)
FA3_FWD_INSTANTIATE(192, 192)
FA3_FWD_INSTANTIATE(192, 128)
#endif
