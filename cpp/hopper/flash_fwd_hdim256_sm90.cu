// fa3_jax Hopper forward instantiations for head dim 256, 16-bit and FP8.
#include "flash_fwd_launch_template_sm90.h"

#if FA3_JAX_BUILD_HDIM(256)
FA3_FWD_INSTANTIATE(256, 256)
FA3_FWD_INSTANTIATE_FP8(256)
#endif
