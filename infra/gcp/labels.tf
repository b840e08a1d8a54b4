# The broker's own resources are labelled as its infrastructure: the
# managed-by label of the broker's tags (kidp.tags.encode_key: the key under
# var.tag_prefix in GCP's label alphabet) with a value of their own,
# "<managed_by>-broker-infra". The orphan scan (GcpProvider.list_managed)
# reports kidp-* resources without a managed-by label as untagged strays;
# with this label the store, the job topics and the source bucket are
# somebody else's. (The Cloud Run service behind each function cannot be
# labelled from here: Cloud Functions labels it goog-managed-by, which the
# scan leaves alone too.)
#
# Only variables are read here: tests/infra/test_terraform_gcp.py evaluates
# this file with `terraform console` and compares it with kidp.tags.
locals {
  managed_by_label = replace(lower("${var.tag_prefix}managed-by"), "/[^a-z0-9_-]/", "_")
  # A label key starts with a letter and has at most 63 characters.
  managed_by_key = substr(
    can(regex("^[a-z]", local.managed_by_label)) ? local.managed_by_label : "k${local.managed_by_label}",
    0,
    63,
  )
  # At most 63 characters, and the suffix always kept: never the broker's own
  # value nor its "-retained" one, however long managed_by is.
  infra_label_value = "${substr(replace(lower(var.managed_by), "/[^a-z0-9_-]/", "_"), 0, 50)}-broker-infra"

  infra_labels = { (local.managed_by_key) = local.infra_label_value }
}
