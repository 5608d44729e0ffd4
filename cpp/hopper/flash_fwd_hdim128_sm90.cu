// fa3_jax Hopper forward instantiations for head dim 128, 16-bit and FP8.
#include "flash_fwd_launch_template_sm90.h"

#if FA3_JAX_BUILD_HDIM(128)
FA3_FWD_INSTANTIATE(128, 128)
FA3_FWD_INSTANTIATE_FP8(128)
#endif
