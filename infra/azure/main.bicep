// The KIDP broker on Azure Functions (Flex Consumption, Python 3.11): the
// function app and its plan, its storage account (the jobs queue and its
// poison queue, the deployments table, the deployment package container),
// Key Vault in RBAC mode for the broker's own keys and the credentials it
// makes, Application Insights, and one user-assigned managed identity with
// the roles it needs and no more. App settings set exactly the KIDP_*
// variables kidp.settings.Settings reads (tests/infra/test_bicep.py checks).
//
//   az deployment group create -g <rg> -f infra/azure/main.bicep -p infra/azure/main.bicepparam

targetScope = 'resourceGroup'

@description('Azure region of every resource (the broker serves this region).')
param location string = resourceGroup().location

@description('Prefix of resource names; the storage account and vault add a unique suffix.')
@minLength(3)
@maxLength(11)
param name string = 'kidp'

@description('The resource group the broker provisions into (Contributor there, nothing elsewhere); another group than this one, which holds the broker itself.')
@minLength(1)
@maxLength(90)
param managedResourceGroupName string

@description('Service Bus namespace (name in the managed group, or resource id) topics go in; empty: no topics.')
param servicebusNamespace string = ''

@description('Container Apps environment (name in the managed group, or resource id) services run in; empty: no services.')
param containerAppsEnvironment string = ''

@description('HS256 key of the bearer tokens (at least 32 bytes); empty when jwtJwksUrl is set.')
@secure()
param jwtSecret string = ''

@description('JWKS of the identity provider whose RS256/ES256 tokens the broker accepts instead.')
param jwtJwksUrl string = ''

@description('Standard Webhooks signing key of the callbacks (whsec_...).')
@secure()
param callbackSecret string

@description('When the two keys above expire in Key Vault (epoch seconds); rotate before.')
param secretsExpireAt int = dateTimeToEpoch(dateTimeAdd(utcNow(), 'P1Y'))

@description('Hosts or CIDRs callbacks may reach despite the SSRF rules, comma-separated.')
param callbackAllowlist string = ''

@description('Deliveries of one job before it is given up; also the queue trigger\'s maxDequeueCount.')
@minValue(2)
param jobMaxDeliveries int = 10

@description('The managed-by tag value of everything the broker creates.')
param managedBy string = 'kidp'

@description('Days a Deleted deployment stays readable.')
param deletedRetentionDays int = 7

@allowed([
  'DEBUG'
  'INFO'
  'WARNING'
  'ERROR'
])
param logLevel string = 'INFO'

@description('Replication of the storage account.')
@allowed([
  'Standard_GRS'
  'Standard_RAGRS'
  'Standard_GZRS'
  'Standard_RAGZRS'
])
param storageSku string = 'Standard_GRS'

@description('Most instances the function app scales out to.')
param maximumInstanceCount int = 40

@description('Days logs are kept in the Log Analytics workspace.')
param logRetentionDays int = 365

var suffix = uniqueString(resourceGroup().id, name)
var storageName = toLower('${name}st${suffix}')
var vaultName = '${name}-kv-${take(suffix, 10)}'
var jobsQueueName = 'kidp-jobs'
var tableName = 'kidp'
var deploymentContainer = 'app-package'
// The broker's own resources carry the broker's managed-by tag key (its default
// KIDP_TAG_PREFIX in Azure's tag alphabet: kidp.tags.encode_key('managed-by',
// dialect='azure')) with a value of their own: the orphan scan sees them as
// someone else's, never as its resources or as untagged look-alikes of them.
var tags = {
  application: 'kidp-broker'
  'platform.company.com_managed-by': '${managedBy}-broker-infra'
}

// Contributor on this group would let the broker's identity change its own
// function app, storage and vault. Naming it makes the deployment fail before
// anything is made: the managed group becomes one that cannot exist ("Resource
// group 'managedResourceGroupName-must-name-another-group-than-the-brokers-own'
// could not be found"). Group names are case-insensitive.
var refusedGroup = 'managedResourceGroupName-must-name-another-group-than-the-brokers-own'
var managedGroup = (toLower(managedResourceGroupName) == toLower(resourceGroup().name)) ? refusedGroup : managedResourceGroupName

// Built-in roles (ids are the same in every tenant).
var roles = {
  storageBlobDataOwner: 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
  storageQueueDataContributor: '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
  storageTableDataContributor: '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
  keyVaultSecretsOfficer: 'b86a8fe4-44ce-4948-aee5-eccb2c155cd7'
  monitoringMetricsPublisher: '3913510d-42f4-4e42-8a64-420c390055eb'
}

var storageRoleIds = [
  roles.storageBlobDataOwner
  roles.storageQueueDataContributor
  roles.storageTableDataContributor
]

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: '${name}-broker'
  location: location
  tags: tags
}

// ------------------------------------------------------------------ storage

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  // checkov:skip=CKV_AZURE_35: the Flex Consumption app reaches its storage over the public endpoint (no VNet here); every client authenticates with Entra ID (shared keys are off)
  // checkov:skip=CKV_AZURE_59: as CKV_AZURE_35: reachable publicly, usable only with an Entra ID token and an RBAC role; blobs are never public
  // checkov:skip=CKV_AZURE_43: the name is computed (name + uniqueString: 3-24 lowercase letters and digits), which checkov cannot evaluate
  name: storageName
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: storageSku
  }
  properties: {
    accessTier: 'Hot'
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    allowBlobPublicAccess: false
    // Every client (the host, the broker, the deployment) uses Entra ID.
    allowSharedKeyAccess: false
    defaultToOAuthAuthentication: true
    allowCrossTenantReplication: false
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: 'Allow'
    }
    encryption: {
      keySource: 'Microsoft.Storage'
      requireInfrastructureEncryption: true
      services: {
        blob: {
          enabled: true
          keyType: 'Account'
        }
        file: {
          enabled: true
          keyType: 'Account'
        }
        queue: {
          enabled: true
          keyType: 'Account'
        }
        table: {
          enabled: true
          keyType: 'Account'
        }
      }
    }
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: storage
  name: 'default'
  properties: {
    deleteRetentionPolicy: {
      enabled: true
      days: 7
    }
    containerDeleteRetentionPolicy: {
      enabled: true
      days: 7
    }
  }
}

resource packageContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: deploymentContainer
  properties: {
    publicAccess: 'None'
  }
}

resource queueService 'Microsoft.Storage/storageAccounts/queueServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

resource jobsQueue 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = {
  parent: queueService
  name: jobsQueueName
}

// Where the host moves a message after maxDequeueCount, and the broker its give-ups.
resource poisonQueue 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = {
  parent: queueService
  name: '${jobsQueueName}-poison'
}

resource tableService 'Microsoft.Storage/storageAccounts/tableServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

resource table 'Microsoft.Storage/storageAccounts/tableServices/tables@2023-05-01' = {
  parent: tableService
  name: tableName
}

// ------------------------------------------------------------------ Key Vault

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  // checkov:skip=CKV_AZURE_109: the function app reaches the vault over the public endpoint (no VNet here); RBAC decides, and only the broker's identity holds a role
  // checkov:skip=CKV_AZURE_189: as CKV_AZURE_109
  name: vaultName
  location: location
  tags: tags
  properties: {
    tenantId: subscription().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 90
    enablePurgeProtection: true
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: 'Allow'
    }
  }
}

resource jwtSecretValue 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = if (!empty(jwtSecret)) {
  // checkov:skip=CKV_AZURE_41: exp is set below (secretsExpireAt); checkov does not read the properties of a conditional resource
  // checkov:skip=CKV_AZURE_114: contentType is set below; as CKV_AZURE_41
  parent: vault
  name: 'kidp-jwt-secret'
  properties: {
    value: jwtSecret
    contentType: 'text/plain'
    attributes: {
      enabled: true
      exp: secretsExpireAt
    }
  }
}

resource callbackSecretValue 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = {
  parent: vault
  name: 'kidp-callback-secret'
  properties: {
    value: callbackSecret
    contentType: 'text/plain'
    attributes: {
      enabled: true
      exp: secretsExpireAt
    }
  }
}

// ------------------------------------------------------------------ monitoring

resource workspace 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: '${name}-logs'
  location: location
  tags: tags
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: logRetentionDays
  }
}

resource insights 'Microsoft.Insights/components@2020-02-02' = {
  name: '${name}-insights'
  location: location
  tags: tags
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: workspace.id
    // Telemetry is sent with the managed identity (Monitoring Metrics Publisher).
    DisableLocalAuth: true
  }
}

// ------------------------------------------------------------------ role assignments

resource storageRoles 'Microsoft.Authorization/roleAssignments@2022-04-01' = [
  for role in storageRoleIds: {
    name: guid(storage.id, identity.id, role)
    scope: storage
    properties: {
      roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', role)
      principalId: identity.properties.principalId
      principalType: 'ServicePrincipal'
    }
  }
]

resource vaultRole 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(vault.id, identity.id, roles.keyVaultSecretsOfficer)
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.keyVaultSecretsOfficer)
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

resource insightsRole 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(insights.id, identity.id, roles.monitoringMetricsPublisher)
  scope: insights
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.monitoringMetricsPublisher)
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

module managedAccess 'modules/managed-access.bicep' = {
  name: '${name}-managed-access'
  scope: resourceGroup(managedGroup)
  params: {
    principalId: identity.properties.principalId
  }
}

// ------------------------------------------------------------------ the function app

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  // checkov:skip=CKV_AZURE_225: zone redundancy depends on the region; Flex Consumption spreads instances, and every job survives an instance in the queue
  name: '${name}-plan'
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    tier: 'FlexConsumption'
    name: 'FC1'
  }
  properties: {
    reserved: true
  }
}

var jwtSecretSetting = {
  name: 'KIDP_JWT_SECRET'
  value: '@Microsoft.KeyVault(SecretUri=${jwtSecretValue.properties.secretUri})'
}
var jwksSetting = {
  name: 'KIDP_JWT_JWKS_URL'
  value: jwtJwksUrl
}
var allowlistSetting = {
  name: 'KIDP_CALLBACK_ALLOWLIST'
  value: callbackAllowlist
}
var jwtSettings = empty(jwtJwksUrl) ? [jwtSecretSetting] : [jwksSetting]
var allowlistSettings = empty(callbackAllowlist) ? [] : [allowlistSetting]
var servicebusSetting = {
  name: 'KIDP_AZURE_SERVICEBUS_NAMESPACE'
  value: servicebusNamespace
}
var containerAppsSetting = {
  name: 'KIDP_AZURE_CONTAINERAPPS_ENVIRONMENT'
  value: containerAppsEnvironment
}
var servicebusSettings = empty(servicebusNamespace) ? [] : [servicebusSetting]
var containerAppsSettings = empty(containerAppsEnvironment) ? [] : [containerAppsSetting]

var baseSettings = [
  // The host's own storage (and the queue trigger's connection), by identity.
  {
    name: 'AzureWebJobsStorage__accountName'
    value: storage.name
  }
  {
    name: 'AzureWebJobsStorage__credential'
    value: 'managedidentity'
  }
  {
    name: 'AzureWebJobsStorage__clientId'
    value: identity.properties.clientId
  }
  // host.json's maxDequeueCount follows the broker's maximum deliveries.
  {
    name: 'AzureFunctionsJobHost__extensions__queues__maxDequeueCount'
    value: string(jobMaxDeliveries)
  }
  {
    name: 'APPLICATIONINSIGHTS_CONNECTION_STRING'
    value: insights.properties.ConnectionString
  }
  {
    name: 'APPLICATIONINSIGHTS_AUTHENTICATION_STRING'
    value: 'ClientId=${identity.properties.clientId};Authorization=AAD'
  }
  // DefaultAzureCredential picks the user-assigned identity by this.
  {
    name: 'AZURE_CLIENT_ID'
    value: identity.properties.clientId
  }
  {
    name: 'KIDP_CLOUD'
    value: 'azure'
  }
  {
    name: 'KIDP_REGION'
    value: location
  }
  // The provider: where it provisions (Contributor there, see modules/managed-access.bicep).
  {
    name: 'KIDP_AZURE_SUBSCRIPTION_ID'
    value: subscription().subscriptionId
  }
  {
    name: 'KIDP_AZURE_RESOURCE_GROUP'
    value: managedGroup
  }
  {
    name: 'KIDP_STORE_URL'
    value: 'azuretable://${storage.name}/${table.name}'
  }
  {
    name: 'KIDP_QUEUE_URL'
    value: 'azurequeue://${storage.name}/${jobsQueue.name}'
  }
  {
    name: 'KIDP_SECRET_STORE'
    value: 'keyvault'
  }
  {
    name: 'KIDP_AZURE_KEY_VAULT_URL'
    value: vault.properties.vaultUri
  }
  {
    name: 'KIDP_CALLBACK_SECRET'
    value: '@Microsoft.KeyVault(SecretUri=${callbackSecretValue.properties.secretUri})'
  }
  {
    name: 'KIDP_JOB_MAX_DELIVERIES'
    value: string(jobMaxDeliveries)
  }
  {
    name: 'KIDP_MANAGED_BY'
    value: managedBy
  }
  {
    name: 'KIDP_DELETED_RETENTION_DAYS'
    value: string(deletedRetentionDays)
  }
  {
    name: 'KIDP_LOG_LEVEL'
    value: logLevel
  }
]

resource functionApp 'Microsoft.Web/sites@2024-04-01' = {
  // checkov:skip=CKV_AZURE_222: the HTTP API is the broker's public entry point; every route but the probes needs a bearer token
  // checkov:skip=CKV_AZURE_17: callers authenticate with bearer tokens (JWT), not client certificates
  // checkov:skip=CKV_AZURE_212: Flex Consumption scales from zero per event; a minimum instance count (alwaysReady) is a cost choice, not a failover need: jobs wait in the queue
  // checkov:skip=CKV_AZURE_213: platform health checks need a fixed instance pool, which Flex Consumption does not have; /health and /readiness serve external probes
  name: '${name}-broker-${take(suffix, 6)}'
  location: location
  tags: tags
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identity.id}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    clientCertEnabled: false
    keyVaultReferenceIdentity: identity.id
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storage.properties.primaryEndpoints.blob}${deploymentContainer}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identity.id
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: 2048
      }
      runtime: {
        name: 'python'
        version: '3.11'
      }
    }
    siteConfig: {
      minTlsVersion: '1.2'
      ftpsState: 'Disabled'
      http20Enabled: true
      appSettings: concat(baseSettings, jwtSettings, allowlistSettings, servicebusSettings, containerAppsSettings)
    }
  }
  dependsOn: [
    storageRoles
    vaultRole
    insightsRole
    packageContainer
    poisonQueue
  ]
}

output functionAppName string = functionApp.name
output apiUrl string = 'https://${functionApp.properties.defaultHostName}'
output identityClientId string = identity.properties.clientId
output vaultUri string = vault.properties.vaultUri
output storageAccountName string = storage.name
