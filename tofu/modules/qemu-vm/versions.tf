terraform {
  # terraform_data (1.4), optional() attribute defaults (1.3) and preconditions (1.2) are all
  # older than 1.6, the first OpenTofu release. The builtin terraform_data provider needs no
  # download, so the module works offline.
  required_version = ">= 1.6.0"
}
