"""QuantConfig errors from a BitsAndBytesConfig dict name the bitsandbytes field the user set."""

import pytest

from shardq.config import QuantConfigError, from_bnb_dict


@pytest.mark.parametrize("d,field", [
    ({"load_in_8bit": True, "llm_int8_threshold": -1.0}, "llm_int8_threshold=-1.0 is invalid"),
    ({"load_in_4bit": True, "bnb_4bit_blocksize": 100}, "bnb_4bit_blocksize=100 is unsupported: use one of"),
    ({"load_in_4bit": True, "bnb_4bit_compute_dtype": "int8"}, "bnb_4bit_compute_dtype='int8' is not a dtype"),
    ({"load_in_4bit": True, "bnb_4bit_quant_type": "int4"}, "bnb_4bit_quant_type='int4' is unknown: use 'nf4' or 'fp4'"),
])
def test_bnb_errors_name_the_bnb_field(d, field):
    with pytest.raises(QuantConfigError, match=field):
        from_bnb_dict(d)
